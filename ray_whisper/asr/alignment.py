"""Word timings from the model's cross-attention, for a batch of chunks at once.

The method is Whisper's: a few decoder heads (the checkpoint's `alignment_heads`) attend to the audio frame
that each text token is spoken at. The chunk's text is fed once more, teacher-forced, after the prefix and
<|notimestamps|>; those heads' attention over the chunk's frames, normalised per head and smoothed in time, is
the similarity of every token to every frame; the cheapest monotonic path through it (dynamic time warping)
says when each token starts. Tokens are grouped into words (at spaces, or per character for languages
written without them), punctuation joins its word, and a word's probability is the mean of its tokens'.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..constants import N_AUDIO_CTX, SECONDS_PER_TOKEN
from ..model.network import Whisper
from .merge import Word
from .tokens import SpecialTokens

MEDIAN_WIDTH = 7  # frames of the median filter over the attention
MAX_MEDIAN_WORD_S = 0.7  # the longest median word duration believed; a word may last twice the median
PREPEND = "\"'“¿([{-"  # punctuation that belongs to the word after it
APPEND = "\"'.。,，!！?？:：”)]}、"  # ... and to the word before it
OPENING_SLACK_S = 0.5  # a segment's opening this much after its first word's start moves that start
SENTENCE_END = ".。!！?？"
UNSPACED = {"zh", "ja", "th", "lo", "my", "yue"}  # written without spaces: one word per character


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest path through `cost` (rows x columns) from the first cell to the last, moving one row down,
    one column right, or both at once; returns its cells as (row indices, column indices).

    Row by row: arriving from above or the diagonal is elementwise; a run of moves to the right is a
    cumulative minimum over prefix sums, so each row is a few vectorised operations."""
    n, m = cost.shape
    previous = np.full(m + 1, np.inf)
    previous[0] = 0.0  # the path enters the first cell from "above-left"
    moves = np.zeros((n, m), dtype=np.int8)  # 0 diagonal, 1 from above, 2 from the left
    for i in range(n):
        diagonal, above = previous[:-1], previous[1:]
        arrive = cost[i] + np.minimum(diagonal, above)
        sums = np.cumsum(cost[i])
        offset = arrive - sums
        best = np.minimum.accumulate(offset)
        moves[i] = np.where(best < offset, 2, np.where(above < diagonal, 1, 0))
        previous = np.concatenate([[np.inf], sums + best])
    rows, cols = [], []
    i, j = n - 1, m - 1
    while i >= 0 and j >= 0:
        rows.append(i)
        cols.append(j)
        move = moves[i, j]
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    return np.array(rows[::-1]), np.array(cols[::-1])


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """A running median along the last axis (edges reflected), width odd."""
    if x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1), axis=-1)


def word_groups(tokens: Sequence[int], decode: Callable[[list[int]], str], spaced: bool) -> list[tuple[str, list[int]]]:
    """Text tokens grouped into words: runs of tokens that decode to whole characters, joined while no space
    (or punctuation) starts a new word; each character a word where the language has no spaces."""
    pieces: list[tuple[str, list[int]]] = []
    run: list[int] = []
    for t in tokens:
        run.append(t)
        text = decode(run)
        if "\ufffd" not in text:
            pieces.append((text, run))
            run = []
    if run:
        pieces.append((decode(run), run))
    if not spaced:
        return pieces
    words: list[tuple[str, list[int]]] = []
    for text, run in pieces:
        if words and not text.startswith(" ") and text.strip() not in string.punctuation:
            words[-1] = (words[-1][0] + text, words[-1][1] + run)
        else:
            words.append((text, run))
    return words


def _attach_punctuation(words: list[Word]) -> list[Word]:
    """A word that is only opening punctuation joins the next word; only closing punctuation, the one before
    it (keeping that word's times)."""
    out: list[Word] = []
    carry: Word | None = None
    for w in words:
        if carry is not None:
            w = Word(carry.word + w.word.lstrip(), w.start, w.end,
                     (carry.probability * carry.tokens + w.probability * w.tokens) / max(carry.tokens + w.tokens, 1),
                     carry.tokens + w.tokens)
            carry = None
        stripped = w.word.strip()
        if stripped and all(ch in PREPEND for ch in stripped) and w.word.startswith(" "):
            carry = w
        elif out and stripped and all(ch in APPEND for ch in stripped):
            prev = out[-1]
            total = prev.tokens + w.tokens
            out[-1] = Word(prev.word + stripped, prev.start, prev.end,
                           (prev.probability * prev.tokens + w.probability * w.tokens) / max(total, 1), total)
        else:
            out.append(w)
    if carry is not None:
        out.append(carry)
    return out


def longest_word_s(words: Sequence[Word]) -> float:
    """How long a word of this chunk may last: twice its median word (at most MAX_MEDIAN_WORD_S); 0 if none."""
    durations = [w.end - w.start for w in words if w.end > w.start]
    return 2 * min(MAX_MEDIAN_WORD_S, float(np.median(durations))) if durations else 0.0


def _clamp_long_words(words: list[Word]) -> list[Word]:
    """A word that DTW stretched over a pause at a sentence boundary lasts at most twice the median word."""
    longest = longest_word_s(words)
    if not longest:
        return words
    out = list(words)
    for i in range(1, len(out)):
        w = out[i]
        if w.end - w.start <= longest:
            continue
        if w.word.strip() in SENTENCE_END:
            out[i] = Word(w.word, w.start, w.start + longest, w.probability, w.tokens)
        elif out[i - 1].word.strip() in SENTENCE_END:
            out[i] = Word(w.word, w.end - longest, w.end, w.probability, w.tokens)
    return out


def _spread(words: list[Word], start: float, end: float) -> list[Word]:
    """`words` laid end to end over [start, end], each its share by tokens."""
    total = sum(max(w.tokens, 1) for w in words)
    out, at, done = [], start, 0
    for w in words:
        done += max(w.tokens, 1)
        until = start + (end - start) * done / total
        out.append(Word(w.word, at, until, w.probability, w.tokens))
        at = until
    return out


def lengthen_instant_words(words: list[Word], duration: float) -> list[Word]:
    """Words the path crossed within one frame (start == end) get time. A sentence said twice can pull the
    attention of its second saying back onto the first, and the path then runs straight down through the
    repeated words' rows. A run of such words takes the pause after it (each at most a typical word, half of
    longest_word_s); with no pause there, it shares the next word's span by tokens, or the previous word's at
    the chunk's end. Words are left alone where nothing around them has time (audio of no length)."""
    out = list(words)
    typical = longest_word_s(out) / 2 or 0.3
    i = 0
    while i < len(out):
        if out[i].end - out[i].start >= SECONDS_PER_TOKEN:
            i += 1
            continue
        j = i + 1  # the run is out[i:j]
        while j < len(out) and out[j].end - out[j].start < SECONDS_PER_TOKEN:
            j += 1
        at = out[i].start
        room = (out[j].start if j < len(out) else duration) - at
        if room >= SECONDS_PER_TOKEN * (j - i):
            out[i:j] = _spread(out[i:j], at, at + min(room, typical * (j - i)))
        elif j < len(out) and out[j].end > at:
            out[i:j + 1] = _spread(out[i:j + 1], at, out[j].end)
        elif i > 0 and at > out[i - 1].start:
            out[i - 1:j] = _spread(out[i - 1:j], out[i - 1].start, max(at, out[i - 1].end))
        i = j
    return out


def open_segment(words: list[Word], opening: float, longest: float) -> list[Word]:
    """A segment's words with its first word shortened to where it is spoken. The path through the attention
    enters a word's row when the previous word ends, or at the chunk's start, so a word after a pause (or
    after quiet noise) starts at the pause: it starts no earlier than the segment's `opening` (Whisper's timestamp,
    or the sound found in the audio) where that falls inside it, and lasts at most `longest` (longest_word_s)."""
    if not words:
        return words
    w = words[0]
    start = w.start
    if start + OPENING_SLACK_S < opening < w.end:
        start = opening
    if longest and w.end - start > longest:
        start = w.end - longest
    return [Word(w.word, start, w.end, w.probability, w.tokens)] + words[1:]


def token_start_frames(attention: np.ndarray, duration: float) -> np.ndarray:
    """The frame (20 ms) each text token starts at, and where the end of text does: `attention` is the
    alignment heads' (heads, text tokens + 1, 1500) weights, `duration` the chunk's seconds of audio."""
    frames = min(N_AUDIO_CTX, max(1, int(round(duration / SECONDS_PER_TOKEN))))
    w = attention[:, :, :frames]
    w = (w - w.mean(axis=1, keepdims=True)) / (w.std(axis=1, keepdims=True) + 1e-8)  # per head, per frame
    similarity = median_filter(w, MEDIAN_WIDTH).mean(axis=0)
    rows, cols = dtw(-similarity)
    first = np.zeros(attention.shape[1])
    entering = np.diff(rows, prepend=-1) > 0  # where the path enters each token's row
    first[rows[entering]] = cols[entering]
    return first


class WordAligner:
    """Word timings for the chunks of a batch: one teacher-forced decoder pass over all of them."""

    def __init__(self, net: Whisper, tokens: SpecialTokens, heads: Sequence[Sequence[int]], task: str,
                 decode: Callable[[list[int]], str]):
        self.net, self.t, self.task, self.decode = net, tokens, task, decode
        self.heads = [(int(layer), int(head)) for layer, head in heads]
        self.device = next(net.parameters()).device

    def __call__(self, encoded: torch.Tensor, texts: list[list[int]], languages: list[str],
                 durations: list[float]) -> list[list[Word]]:
        """Words of each chunk: `encoded` its encoder output (chunks, 1500, d_model), `texts` its text tokens."""
        prefixes = [self.t.prompt(lang, self.task, timestamps=False) for lang in languages]
        seqs = [p + text + [self.t.eot] for p, text in zip(prefixes, texts)]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [self.t.eot] * (width - len(s)) for s in seqs], device=self.device)
        with torch.inference_mode():
            cache = self.net.new_cache(encoded, width)
            logits, weights = self.net.decode(ids, cache, every_position=True, attention_heads=self.heads)
            logprobs = logits.log_softmax(-1)
        out = []
        for i, (prefix, text) in enumerate(zip(prefixes, texts)):
            first = len(prefix) - 1  # the position that predicts the first text token
            rows = slice(first, first + len(text) + 1)  # ... through the one that predicts the end of text
            attention = weights[i, :, rows].float().cpu().numpy()
            probs = logprobs[i, first : first + len(text)].gather(1, ids[i, first + 1 : first + 1 + len(text), None])
            out.append(self._words(attention, text, probs[:, 0].exp().cpu().numpy(), languages[i], durations[i]))
        return out

    def _words(self, attention: np.ndarray, text: list[int], probs: np.ndarray, language: str, duration: float) -> list[Word]:
        if not text:
            return []
        times = token_start_frames(attention, duration) * SECONDS_PER_TOKEN
        words, at = [], 0
        for word, run in word_groups(text, self.decode, language not in UNSPACED):
            end = at + len(run)
            words.append(Word(word, float(times[at]), float(times[end]), float(probs[at:end].mean()), len(run)))
            at = end
        return lengthen_instant_words(_attach_punctuation(_clamp_long_words(words)), duration)
