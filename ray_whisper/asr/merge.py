"""Stitch the chunks of one file back into one transcript: pure functions on token ids, no model.

Each chunk's output is a list of segments (start, end, token ids) with times in seconds from the start of
the chunk. Chunks cut at a pause share no audio and concatenate. Chunks cut inside sound share an
overlap that both transcribed; there the token sequences are aligned on their longest common run and
spliced in its middle, so the shared words appear once. When the two readings share no run of at least
MIN_MATCH tokens, the splice falls back to the cut time, with token times estimated inside segments.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import schema
from ..constants import SAMPLE_RATE
from .chunking import Chunk
from .tokens import vote_language

MIN_MATCH = 2  # a single shared token (" the") is too weak to align on
NOT_WORDS = string.punctuation + string.whitespace + "。，、！？…¿¡“”«»"  # a segment of only these has no word


@dataclass(frozen=True)
class Word:
    """One timed word (alignment.WordAligner finds them)."""

    word: str  # as spoken, with its leading space and attached punctuation
    start: float  # seconds: from the chunk's start in a ChunkTranscript, from the file's in a Segment
    end: float
    probability: float
    tokens: int  # how many of its segment's text tokens it spans


@dataclass
class ChunkTranscript:
    """What the engine decoded for one chunk: segments (start_s, end_s, text tokens) relative to the chunk, and
    how it decoded. The one result type of the engine, the batch job's token rows and the endpoint."""

    segments: list[tuple[float, float, list[int]]]
    language: str | None
    no_speech_prob: float
    avg_logprob: float
    temperature: float = 0.0
    language_prob: float = float("nan")  # of `language`, where it was detected
    words: list[list[Word]] | None = None  # per segment, with word timestamps on


NOTHING = ChunkTranscript([], None, math.nan, math.nan)  # a chunk not decoded: silent, or its file failed


@dataclass(frozen=True)
class TokenSegment:
    start: float  # seconds
    end: float
    tokens: tuple[int, ...]
    language: str | None = None  # the language its chunk was decoded in
    words: tuple[Word, ...] = ()  # with word timestamps: its words, covering its tokens in order

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
    def of(cls, chunk: Chunk, result: ChunkTranscript) -> "ChunkResult":
        """A chunk (geometry in samples at 16 kHz) and what the engine decoded for it."""
        sr = SAMPLE_RATE
        words = result.words if result.words is not None else [[] for _ in result.segments]
        segs = tuple(TokenSegment(float(a), float(b), tuple(int(t) for t in toks), result.language, tuple(ws))
                     for (a, b, toks), ws in zip(result.segments, words))
        return cls(chunk.index, chunk.start / sr, chunk.end / sr, chunk.stride_left / sr, chunk.stride_right / sr, segs)


@dataclass(frozen=True)
class Segment:
    """One output segment; maps to the `segments` struct of the output table."""

    start: float
    end: float
    text: str
    language: str | None = None
    words: tuple[Word, ...] = ()


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
        words = tuple(Word(w.word, _clip(chunk.start + w.start, chunk), _clip(chunk.start + w.end, chunk),
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
        words = tuple(Word(w.word, round(min(max(w.start, start), end), 3), round(min(max(w.end, start), end), 3),
                                w.probability, w.tokens) for w in s.words)
        out.append(TokenSegment(round(start, 3), round(end, 3), s.tokens, s.language, words))
        last_end = end
    return out


def _clip(t: float, chunk: ChunkResult) -> float:
    return min(max(t, chunk.start), chunk.end)


def to_text(segs: Sequence[TokenSegment], decode: Callable[[Sequence[int]], str]) -> tuple[str, list[Segment]]:
    """Decode token segments into (full text, output segments); segments without words are dropped: empty, or
    only punctuation (". . . . .", which Whisper invents in low rumbling noise)."""
    out: list[Segment] = []
    pieces: list[str] = []
    for s in segs:
        text = decode(s.tokens)
        if text.strip(NOT_WORDS):
            pieces.append(text)
            out.append(Segment(s.start, s.end, text.strip(), s.language, s.words))
    return " ".join(" ".join(pieces).split()), out


@dataclass(frozen=True)
class FileTranscript:
    """One file's transcript: its chunks merged, in file time."""

    text: str
    segments: list[Segment]
    language: str | None  # the language most of its chunks were decoded in
    language_probability: float | None  # mean over the chunks decoded in it, where it was detected
    duration_s: float
    num_chunks: int

    def columns(self, word_timestamps: bool) -> dict[str, Any]:
        """The transcript's columns of the output table (schema.OUTPUT_SCHEMA); `words` only with
        `word_timestamps`."""
        words = [{"word": w.word, "start": w.start, "end": w.end, "probability": round(w.probability, 4)}
                 for s in self.segments for w in s.words]
        return {
            schema.TEXT: self.text,
            schema.SEGMENTS: [{"start": s.start, "end": s.end, "text": s.text, "language": s.language}
                              for s in self.segments],
            schema.WORDS: words if word_timestamps else None,
            schema.LANGUAGE: self.language,
            schema.LANGUAGE_PROBABILITY: self.language_probability,
            schema.DURATION_S: self.duration_s,
            schema.NUM_CHUNKS: self.num_chunks,
        }


def merge_file(chunks: Sequence[Chunk], results: Sequence[ChunkTranscript],
               text_of: Callable[[Sequence[int]], str]) -> FileTranscript:
    """All of one file's chunks, in order, with what the engine decoded for each (NOTHING where it decoded
    nothing) -> the file's transcript. The one path from chunks to a transcript: the batch job's assemble
    stage, the endpoint and the evaluation helpers all take it."""
    text, segments = to_text(merge_chunks([ChunkResult.of(c, r) for c, r in zip(chunks, results, strict=True)]),
                             text_of)
    language = vote_language([r.language for r in results if r.language])
    probs = [r.language_prob for r in results if r.language == language and math.isfinite(r.language_prob)]
    return FileTranscript(text, segments, language, round(sum(probs) / len(probs), 4) if probs else None,
                          round(max(c.end for c in chunks) / SAMPLE_RATE, 3), len(chunks))
