"""The passes over a batch of chunks, on top of the decoder: Whisper's rules for what a decoding is worth.

- silence: a likely no-speech chunk decoded with low confidence has no text (it would be invented);
- fallback: a chunk whose text repeats itself (its zlib compression ratio above --compression-ratio-threshold)
  or whose mean log-probability is below --logprob-threshold is decoded again at the next of --temperatures,
  sampling with a seed of its own; only the failing chunks go round again, batched with each other, and the
  no-speech rule still wins;
- hold: Whisper often stops well before the end of its chunk, after the timestamps that end one segment and
  open the next, and leaves that segment to a next window (in its own sequential decoding the window that
  starts there). Here chunks are cut at pauses where there are any, so while a chunk's last timestamp is more
  than 1 s before its last sound, the end of text is refused after a timestamp (decoding.Decoder, greedy):
  Whisper goes on to the end in the same pass, with the encoder output it already has;
- seek: a chunk that still stops early (after text, under beam search, which holds nothing, or at a fallback
  temperature) is decoded again from its last timestamp (once) when there is sound after it; the second pass's
  segments are appended. On that pass the fallback watches for loops only, not for low log-probability: the
  tail is a few words padded with silence (in Whisper's own loop they would open the next window, with the
  audio after them), its short decoding scores around -1 whatever it says, and five more temperatures never
  found better text (benchmarks/features.py: 28% of the decode time, same WER).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .alignment import WordAligner, longest_word_s, open_segment
from ..config import DecodingOptions
from ..constants import FRAMES_PER_S
from .decoding import Decoded, Decoder
from .merge import ChunkTranscript
from .tokens import segments_from_tokens

FALLBACK_ROWS = 8  # the rows of a fallback wave: each failing chunk at up to this many temperatures / chunks
SEEK_SLACK_S = 1.0  # a chunk whose decoded speech ends this much before its end may have lost words
LOUD_FRAMES = 10  # 0.1 s: the mel frames averaged to tell sound from the chunk's floor
ONSET_SLACK_S = 0.5  # a pass's first segment opening this much before the first sound in it opens at that sound
ONSET_SHARE = 0.2  # a sound begins a fifth of the way up from the chunk's quietest 0.1 s to its loudest ...
ONSET_RANGE = 0.25  # ... in a chunk whose loudest is this far above its quietest (log-mel units: 10 dB)


def transcribe_chunks(decoder: Decoder, feats: np.ndarray, languages: list[str | None], durations: list[float],
                      text_of: Callable[[list[int]], str], prompts: list[list[int]] | None = None,
                      seeds: list[int] | None = None, aligner: WordAligner | None = None) -> list[ChunkTranscript]:
    """Decode chunks into timed segments under the three rules above, and with an `aligner` time their
    words. `text_of` turns token ids into text (for the compression ratio); `prompts` and `seeds` are per
    chunk, as Decoder takes them."""
    opt = decoder.opt
    n = len(durations)
    prompts, seeds = prompts or [None] * n, seeds or list(range(n))
    decoder.tally.chunks += n
    encoded = decoder.encode(feats)
    hold = None
    if opt.timestamps:
        ends = [_last_sound_s(feats[i], duration) for i, duration in enumerate(durations)]
        hold = [None if end is None else end - SEEK_SLACK_S for end in ends]
    decoded = _with_fallback(decoder, feats, languages, prompts, seeds, text_of, encoded, hold=hold)
    out = _seek(decoder, feats, durations, decoded, prompts, seeds, text_of)
    for i, (row, duration) in enumerate(zip(out, durations)):
        row.segments[:1] = _open_at_sound(feats[i], row.segments[:1], duration)
    if aligner is not None:
        _add_words(aligner, encoded, out, durations)
    return out


def _seek(decoder: Decoder, feats: np.ndarray, durations: list[float], decoded: list[Decoded], prompts: list,
          seeds: list[int], text_of: Callable[[list[int]], str]) -> list[ChunkTranscript]:
    opt = decoder.opt
    out = [_transcript(decoder, d, duration) for d, duration in zip(decoded, durations)]
    if not opt.timestamps:
        return out
    again = [
        (i, row.segments[-1][1]) for i, (row, duration) in enumerate(zip(out, durations))
        if row.segments and row.segments[-1][1] < duration - SEEK_SLACK_S
        and _has_sound(feats[i], row.segments[-1][1], duration)
    ]
    if again:
        decoder.tally.second_passes += len(again)
        with decoder.tally.timing("second_pass_s"):
            shifted = np.stack([_shift(feats[i], resume) for i, resume in again])
            rows = [i for i, _ in again]
            second = _with_fallback(decoder, shifted, [out[i].language for i in rows], [prompts[i] for i in rows],
                                    [seeds[i] + 1 for i in rows], text_of, loops_only=True)
        for k, ((i, resume), d) in enumerate(zip(again, second)):
            extra = _transcript(decoder, d, durations[i] - resume).segments
            extra[:1] = _open_at_sound(shifted[k], extra[:1], durations[i] - resume)
            out[i].segments += [(resume + s, resume + e, t) for s, e, t in extra]
    return out


def compression_ratio(text: str) -> float:
    """Bytes of the text over bytes of its zlib compression: a text that loops compresses well (above ~2.4)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _silent(d: Decoded, opt: DecodingOptions) -> bool:
    return d.no_speech_prob > opt.no_speech_threshold and d.avg_logprob < opt.logprob_threshold


def _loops(tokens: list[int], opt: DecodingOptions, text_of: Callable[[list[int]], str]) -> bool:
    """Whether a decoding's tokens (timestamps included) loop: their text's compression ratio is over
    --compression-ratio-threshold."""
    return compression_ratio(text_of(tokens)) > opt.compression_ratio_threshold


def _failed(d: Decoded, opt: DecodingOptions, text_of: Callable[[list[int]], str], loops_only: bool = False) -> bool:
    if _silent(d, opt):
        return False  # silence, not a failed decoding: no text either way
    return _loops(d.tokens, opt, text_of) or (not loops_only and d.avg_logprob < opt.logprob_threshold)


def _add_words(aligner: WordAligner, encoded: Any, out: list[ChunkTranscript], durations: list[float]) -> None:
    """Time the words of every chunk with text, in one pass; segments then start and end with their words."""
    rows = [i for i, c in enumerate(out) if c.segments]
    if not rows:
        return
    texts = [[t for _, _, tokens in out[i].segments for t in tokens] for i in rows]
    timed = aligner(encoded[rows], texts, [out[i].language for i in rows], [durations[i] for i in rows])
    for i, words in zip(rows, timed):
        chunk = out[i]
        firsts = np.cumsum([0] + [w.tokens for w in words])[:-1]  # each word's first token in the chunk's text
        chunk.words, at, longest = [], 0, longest_word_s(words)
        for start, end, tokens in chunk.segments:  # a word goes to the segment its first token is in
            own = [w for w, first in zip(words, firsts) if at <= first < at + len(tokens)]
            chunk.words.append(open_segment(own, start, longest))
            at += len(tokens)
        chunk.segments = [(ws[0].start, ws[-1].end, tokens) if ws else (start, end, tokens)
                          for (start, end, tokens), ws in zip(chunk.segments, chunk.words)]


def _with_fallback(decoder: Decoder, feats: np.ndarray, languages: list[str | None], prompts: list, seeds: list[int],
                   text_of: Callable[[list[int]], str], encoded: Any = None, loops_only: bool = False,
                   hold: list[float | None] | None = None) -> list[Decoded]:
    """Decode at the first temperature; decode the chunks that fail again at each next one, together. A chunk
    that fails at every temperature keeps its best attempt: the likeliest among those that do not loop.
    `loops_only`: only a loop counts as failing (the seek pass). `hold` (per chunk, see the module's rules)
    holds the first decoding only: a chunk that failed is one Whisper is unsure of, and made to go on at a
    higher temperature it loops (tiny.en on German speech) where left free it may find calm text."""
    opt = decoder.opt
    temperatures = opt.temperature_steps

    def loops(tokens: list[int]) -> bool:  # a decoding that already loops stops there: it fails either way
        return _loops(tokens, opt, text_of)

    def good(r: Decoded) -> bool:
        return not _failed(r, opt, text_of, loops_only)

    encoded = decoder.encode(feats) if encoded is None else encoded  # once: the fallbacks reuse it
    results = decoder(feats, languages, prompts, temperatures[0], seeds, encoded, hold, loops)
    attempts = [[r] for r in results]
    remaining = list(temperatures[1:])
    while remaining:
        redo = [i for i, r in enumerate(results) if not good(r)]
        if not redo:
            break
        # the next temperatures at once, as many as FALLBACK_ROWS rows allow: a step of a few rows costs
        # nearly what one row's does, and a chunk's later attempts stop once an earlier one ends good
        wave = remaining[: max(1, FALLBACK_ROWS // len(redo))]
        remaining = remaining[len(wave):]
        jobs = [(i, t) for i in redo for t in wave]
        rows = [i for i, _ in jobs]
        decoder.tally.fallback_decodings += len(jobs)
        with decoder.tally.timing("fallback_s"):
            again = decoder(feats[rows], [results[i].language for i in rows], [prompts[i] for i in rows],
                            [t for _, t in jobs], [seeds[i] for i in rows], encoded[rows], loops=loops,
                            attempts=(rows, good))
        for i, r in zip(rows, again):
            if good(results[i]):
                continue  # an attempt after this chunk's first good one in the wave: not wanted
            if math.isnan(r.language_prob):  # decoded in the language detected the first time: keep its probability
                r.language_prob = results[i].language_prob
            results[i] = r
            attempts[i].append(r)
    decoder.tally.fallback_chunks += sum(len(tried) > 1 for tried in attempts)
    for i, tried in enumerate(attempts):
        if len(tried) > 1 and _failed(results[i], opt, text_of, loops_only):
            calm = [r for r in tried if not loops(r.tokens)]
            results[i] = max(calm or tried, key=lambda r: r.avg_logprob)
    return results


def _transcript(decoder: Decoder, d: Decoded, duration: float) -> ChunkTranscript:
    opt = decoder.opt
    segments = [] if _silent(d, opt) else segments_from_tokens(d.tokens, decoder.t, duration, opt.timestamps)
    return ChunkTranscript(segments, d.language, d.no_speech_prob, d.avg_logprob, d.temperature, d.language_prob)


def _has_sound(feats: np.ndarray, from_s: float, to_s: float) -> bool:
    """Whether the chunk's mel frames between two times rise well above the chunk's quietest level."""
    last = _last_loud_frame(feats, to_s)
    return last is not None and last >= int(from_s * FRAMES_PER_S)


def _last_sound_s(feats: np.ndarray, to_s: float) -> float | None:
    """When the chunk's last sound (as _has_sound hears it) ends, in seconds; None where it has none."""
    last = _last_loud_frame(feats, to_s)
    return None if last is None else (last + LOUD_FRAMES) / FRAMES_PER_S


def _last_loud_frame(feats: np.ndarray, to_s: float) -> int | None:
    """The first frame of the chunk's last 0.1 s (before `to_s`) whose mean level is over halfway from the
    chunk's quietest frame to its 90th percentile; None where there is none."""
    level = feats.mean(axis=0)[: int(to_s * FRAMES_PER_S)]
    if level.size < LOUD_FRAMES:
        return None
    smooth = np.convolve(level, np.full(LOUD_FRAMES, 1 / LOUD_FRAMES), mode="valid")
    floor, loud = float(level.min()), float(np.percentile(level, 90))
    above = np.flatnonzero(smooth > floor + 0.5 * (loud - floor))
    return int(above[-1]) if above.size else None


def _open_at_sound(feats: np.ndarray, first: list[tuple[float, float, list[int]]],
                   duration: float) -> list[tuple[float, float, list[int]]]:
    """A decoding pass's first segment (a list of at most one), opened where its sound begins: Whisper must
    open a window's first segment within its first second (decoding.TimestampRules), and after a long stretch
    of quiet noise it does so at 0.00, seconds before the speech."""
    if not first:
        return first
    start, end, tokens = first[0]
    onset = _first_sound_s(feats, start, end, duration)
    if onset is not None and onset - start > ONSET_SLACK_S:
        start = onset
    return [(start, end, tokens)]


def _first_sound_s(feats: np.ndarray, from_s: float, to_s: float, duration: float) -> float | None:
    """When the first sound between two times begins, in seconds: the first 0.1 s whose mean level is
    ONSET_SHARE of the way up from the chunk's quietest 0.1 s to its loudest; None where there is none, or
    where the chunk's levels span too little to tell sound from its floor."""
    level = feats.mean(axis=0)[: int(duration * FRAMES_PER_S)]
    if level.size < LOUD_FRAMES:
        return None
    smooth = np.convolve(level, np.full(LOUD_FRAMES, 1 / LOUD_FRAMES), mode="valid")
    floor, loud = float(smooth.min()), float(smooth.max())
    if loud - floor < ONSET_RANGE:
        return None
    lo, hi = int(from_s * FRAMES_PER_S), int(to_s * FRAMES_PER_S)
    above = np.flatnonzero(smooth[lo:hi] > floor + ONSET_SHARE * (loud - floor))
    return (lo + int(above[0])) / FRAMES_PER_S if above.size else None


def _shift(feats: np.ndarray, from_s: float) -> np.ndarray:
    """The chunk's features from `from_s` on, padded at the end with the level Whisper gives silence."""
    k = int(round(from_s * FRAMES_PER_S))
    out = np.full_like(feats, feats.max() - 2.0)  # Whisper floors at 8 log10 units below the peak, scaled by 1/4
    out[:, : feats.shape[1] - k] = feats[:, k:]
    return out
