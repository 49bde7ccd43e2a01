"""Stitch the chunks of one file back into one transcript: pure functions on token ids, no model.

Each chunk's output is a list of segments (start, end, token ids) with times in seconds from the start of
the chunk. Chunks cut at a pause share no audio and concatenate. Chunks cut inside sound share an
overlap that both transcribed; there the token sequences are aligned on their longest common run and
spliced in its middle, so the shared words appear once. When the two readings share no run of at least
MIN_MATCH tokens, the splice falls back to the cut time, with token times estimated inside segments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..constants import SAMPLE_RATE

MIN_MATCH = 2  # a single shared token (" the") is too weak to align on


@dataclass(frozen=True)
class TimedWord:
    word: str
    start: float  # seconds
    end: float
    probability: float
    tokens: int  # how many of its segment's tokens it spans


@dataclass(frozen=True)
class TokenSegment:
    start: float  # seconds
    end: float
    tokens: tuple[int, ...]
    language: str | None = None  # the language its chunk was decoded in
    words: tuple[TimedWord, ...] = ()  # with word timestamps: its words, covering its tokens in order

    def trimmed(self, first: int, last: int) -> TokenSegment:
        """The segment's tokens[first:last], with the words that lie wholly inside them."""
        kept, at = [], 0
        for w in self.words:
            if first <= at and at + w.tokens <= last:
                kept.append(w)
            at += w.tokens
        return TokenSegment(self.start, self.end, self.tokens[first:last], self.language, tuple(kept))


@dataclass(frozen=True)
class ChunkResult:
    """What the model produced for one chunk, with the chunk's geometry in seconds from file start."""

    index: int
    start: float
    end: float
    stride_left: float
    stride_right: float
    segments: tuple[TokenSegment, ...]  # times relative to the chunk start

    @classmethod
    def from_samples(cls, index: int, start: int, end: int, stride_left: int, stride_right: int, segments,
                     language: str | None = None, words=None) -> "ChunkResult":
        """From chunk geometry in samples at 16 kHz, (start_s, end_s, token ids) segments and, per segment, its
        words as dicts (word, start, end, probability, tokens)."""
        sr = SAMPLE_RATE
        segments = list(segments)
        words = list(words) if words is not None else [[] for _ in segments]
        segs = tuple(
            TokenSegment(float(a), float(b), tuple(int(t) for t in toks), language,
                         tuple(TimedWord(str(w["word"]), float(w["start"]), float(w["end"]), float(w["probability"]),
                                         int(w["tokens"])) for w in ws))
            for (a, b, toks), ws in zip(segments, words)
        )
        return cls(int(index), start / sr, end / sr, stride_left / sr, stride_right / sr, segs)


@dataclass(frozen=True)
class Segment:
    """One output segment; maps to the `segments` struct of the output table."""

    start: float
    end: float
    text: str
    language: str | None = None
    words: tuple[TimedWord, ...] = ()


@dataclass
class _Token:
    time: float  # estimated, seconds from file start
    token: int
    seg: int  # index of the segment it came from, within its chunk


def _flatten(chunk: ChunkResult) -> tuple[list[_Token], list[TokenSegment]]:
    """Absolute-time segments clipped to the chunk, and their tokens with times spread over each segment."""
    segs: list[TokenSegment] = []
    tokens: list[_Token] = []
    for seg in chunk.segments:
        start = min(max(chunk.start + seg.start, chunk.start), chunk.end)
        end = min(max(chunk.start + seg.end, start), chunk.end)
        if not seg.tokens:
            continue
        n = len(seg.tokens)
        for k, t in enumerate(seg.tokens):
            tokens.append(_Token(start + (end - start) * (k + 0.5) / n, t, len(segs)))
        words = tuple(TimedWord(w.word, _clip(chunk.start + w.start, chunk), _clip(chunk.start + w.end, chunk),
                                w.probability, w.tokens) for w in seg.words)
        segs.append(TokenSegment(start, end, tuple(seg.tokens), seg.language, words))
    return tokens, segs


def longest_common_run(
    a: Sequence[int], b: Sequence[int], compatible: Callable[[int, int], bool] | None = None
) -> tuple[int, int, int]:
    """(i, j, length) of the longest run with a[i:i+length] == b[j:j+length]; later runs in `a` win ties.

    `compatible(i, j)` can veto runs that start at implausible positions (a phrase repeated elsewhere)."""
    best = (0, 0, 0)
    prev = [0] * (len(b) + 1)
    for i in range(1, len(a) + 1):
        cur = [0] * (len(b) + 1)
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                cur[j] = prev[j - 1] + 1
                start_i, start_j = i - cur[j], j - cur[j]
                if cur[j] >= best[2] and (compatible is None or compatible(start_i, start_j)):
                    best = (start_i, start_j, cur[j])
        prev = cur
    return best


def _splice_points(
    left: list[_Token], right: list[_Token], overlap: tuple[float, float], spans: tuple[float, float]
) -> tuple[int, int]:
    """How many tokens of `left` to keep, and from which token of `right` to resume.

    `spans` are the lengths in seconds of the two chunks meeting here."""
    lo, hi = overlap
    # Token times are estimates (spread evenly inside a segment, and a chunk without timestamps is one
    # segment), so look beyond the shared audio by its length plus a quarter of each chunk.
    left_margin = (hi - lo) + 0.25 * spans[0]
    right_margin = (hi - lo) + 0.25 * spans[1]
    li = next((k for k, t in enumerate(left) if t.time >= lo - left_margin), len(left))
    rj = next((k for k, t in enumerate(right) if t.time > hi + right_margin), len(right))
    tail = [t.token for t in left[li:]]
    head = [t.token for t in right[:rj]]
    # Both chunks heard the shared words at the same moment: a run whose two copies are far apart in
    # time is a phrase repeated elsewhere, not the overlap.
    tolerance = (hi - lo) + 0.15 * max(spans)
    i, j, n = longest_common_run(
        tail, head, lambda a, b: abs(left[li + a].time - right[b].time) <= tolerance
    )
    if n >= MIN_MATCH:
        half = n // 2
        return li + i + half, j + half
    cut = (lo + hi) / 2
    keep = sum(1 for t in left if t.time < cut)
    resume = sum(1 for t in right if t.time < cut)
    return keep, resume


def _cut_segments(segs: list[TokenSegment], tokens: list[_Token], lo: int, hi: int) -> list[TokenSegment]:
    """The segments holding tokens[lo:hi], each trimmed to the tokens inside that range."""
    out: list[TokenSegment] = []
    for s_idx, seg in enumerate(segs):
        before = sum(1 for t in tokens[:lo] if t.seg == s_idx)
        kept = sum(1 for t in tokens[lo:hi] if t.seg == s_idx)
        if kept:
            out.append(seg.trimmed(before, before + kept))
    return out


def merge_chunks(chunks: Sequence[ChunkResult]) -> list[TokenSegment]:
    """One file's chunks (any order) -> its segments in file time, overlaps resolved, times monotonic."""
    merged: list[TokenSegment] = []
    prev: ChunkResult | None = None
    for chunk in sorted(chunks, key=lambda c: c.index):
        tokens, segs = _flatten(chunk)
        if prev is None or chunk.stride_left <= 0 or not merged:
            merged.extend(segs)
        else:
            overlap = (chunk.start, chunk.start + chunk.stride_left + prev.stride_right)
            # only the previous chunk's segments can meet this one; earlier ones are final
            first = next((k for k, s in enumerate(merged) if s.end > prev.start), len(merged))
            final, merged = merged[:first], merged[first:]
            left_tokens = [
                _Token(s.start + (s.end - s.start) * (k + 0.5) / len(s.tokens), t, n)
                for n, s in enumerate(merged)
                for k, t in enumerate(s.tokens)
            ]
            spans = (prev.end - prev.start, chunk.end - chunk.start)
            keep, resume = _splice_points(left_tokens, tokens, overlap, spans)
            head = _cut_segments(merged, left_tokens, 0, keep)
            tail = _cut_segments(segs, tokens, resume, len(tokens))
            if head and tail and _splits_a_segment(left_tokens, keep, tokens, resume):
                # the splice fell inside a segment on either side: join the two halves into one segment
                joined = TokenSegment(head[-1].start, tail[0].end, head[-1].tokens + tail[0].tokens, head[-1].language,
                                      head[-1].words + tail[0].words)
                head, tail = head[:-1] + [joined], tail[1:]
            merged = final + head + tail
        prev = chunk
    return _monotonic(merged)


def _splits_a_segment(left: list[_Token], keep: int, right: list[_Token], resume: int) -> bool:
    """Whether the splice cut through a segment on at least one side (so the halves belong together)."""
    left_cut = 0 < keep < len(left) and left[keep - 1].seg == left[keep].seg
    right_cut = 0 < resume < len(right) and right[resume - 1].seg == right[resume].seg
    return left_cut or right_cut


def _monotonic(segs: list[TokenSegment]) -> list[TokenSegment]:
    out: list[TokenSegment] = []
    last_end = 0.0
    for s in segs:
        start = max(s.start, last_end)
        end = max(s.end, start)
        words = tuple(TimedWord(w.word, round(min(max(w.start, start), end), 3), round(min(max(w.end, start), end), 3),
                                w.probability, w.tokens) for w in s.words)
        out.append(TokenSegment(round(start, 3), round(end, 3), s.tokens, s.language, words))
        last_end = end
    return out


def _clip(t: float, chunk: ChunkResult) -> float:
    return min(max(t, chunk.start), chunk.end)


def to_text(segs: Sequence[TokenSegment], decode: Callable[[Sequence[int]], str]) -> tuple[str, list[Segment]]:
    """Decode token segments into (full text, output segments); segments without words are dropped."""
    out: list[Segment] = []
    pieces: list[str] = []
    for s in segs:
        text = decode(s.tokens)
        if text.strip():
            pieces.append(text)
            out.append(Segment(s.start, s.end, text.strip(), s.language, s.words))
    return " ".join(" ".join(pieces).split()), out
