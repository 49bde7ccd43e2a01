"""Scoring and test material shared by the tests and the benchmark: WER after Whisper's English
normalisation, long speech built by concatenating real clips, WAV files of it, and in-memory transcription of
one array with the pipeline's own windows, decoder and merge (no Ray, no I/O)."""

from __future__ import annotations

import json
import wave
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from . import features
from .chunking import iter_chunks
from ..config import ChunkOptions
from ..constants import SAMPLE_RATE
from .merge import ChunkResult, merge_chunks, to_text

SPELLING = Path(__file__).parents[1] / "data" / "english_spelling.json"  # Whisper's English spelling map (MIT)


@lru_cache(maxsize=1)
def _normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(json.loads(SPELLING.read_text()))


def normalize(text: str) -> str:
    """Whisper's English normalisation (lower case, spelling, numbers, no punctuation)."""
    return _normalizer()(text)


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference length) after normalisation."""
    ref, hyp = normalize(reference).split(), normalize(hypothesis).split()
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1], len(ref)


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate: total edits over total reference words."""
    edits = words = 0
    for r, h in zip(references, hypotheses, strict=True):
        e, n = word_errors(r, h)
        edits, words = edits + e, words + n
    return edits / max(words, 1)


def build_long_speech(
    clips: list[tuple[np.ndarray, str]], min_seconds: float, seed: int = 0, gaps_s: tuple[float, ...] = (0.0, 0.0, 0.15, 0.4, 1.0, 2.5)
) -> tuple[np.ndarray, str]:
    """Concatenate real speech clips in a seeded random order with varied gaps (some none, so that
    window boundaries fall inside words) until `min_seconds`; returns (audio, reference text)."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    refs: list[str] = []
    total = 0
    while total < min_seconds * SAMPLE_RATE:
        audio, text = clips[int(rng.integers(len(clips)))]
        gap = np.zeros(int(float(rng.choice(gaps_s)) * SAMPLE_RATE), dtype=np.float32)
        parts += [audio.astype(np.float32), gap]
        refs.append(text)
        total += audio.size + gap.size
    return np.concatenate(parts), " ".join(refs)


def write_wav(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """16-bit PCM mono WAV with the standard library (no encoder needed)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return path


def transcribe_in_memory(audio: np.ndarray, transcriber: Any, chunks: Any = None, batch_size: int = 8) -> tuple[str, list]:
    """One waveform through the pipeline's own stages in this process (chunks, features, decoder, merge).
    `transcriber` is an `inference.Transcriber`, `chunks` a config.ChunkOptions. Returns (text, segments)."""
    pieces = list(iter_chunks([audio], (chunks or ChunkOptions()).geometry()))
    results = []
    for i in range(0, len(pieces), batch_size):
        group = pieces[i : i + batch_size]
        feats = features.log_mel([a for _, a in group], transcriber.n_mels)
        decoded = transcriber.decode(feats, [None] * len(group), [len(a) / SAMPLE_RATE for _, a in group])
        for (c, _), r in zip(group, decoded):
            results.append(ChunkResult.from_samples(c.index, c.start, c.end, c.stride_left, c.stride_right, r.segments))
    tok = transcriber.tokenizer
    return to_text(merge_chunks(results), lambda ids: tok.decode(list(ids), skip_special_tokens=True))
