"""Scoring and test material shared by the tests and the benchmark: WER after Whisper's English
normalisation, long speech built by concatenating real clips, WAV files of it, and in-memory transcription of
one array with the batch job's own chunks, engine and merge (no Ray, no I/O)."""

from __future__ import annotations

import json
import wave
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import ChunkOptions
from ..constants import SAMPLE_RATE
from .chunking import ChunkGeometry, is_silent, iter_chunks
from .merge import NOTHING, ChunkTranscript, Segment, merge_file

if TYPE_CHECKING:  # the engine imports torch; scoring and test material need none
    from .engine import Engine

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


def transcribe_in_memory(audio: np.ndarray, engine: Engine, chunks: ChunkOptions | None = None,
                         batch_size: int = 8) -> tuple[str, list[Segment]]:
    """One waveform through the batch job's own steps in this process: its chunks, the engine, the merge.
    Silent chunks are not decoded, as in the batch job and the endpoint. Returns (text, segments)."""
    pieces = list(iter_chunks([audio], ChunkGeometry.of(chunks or ChunkOptions())))
    audible = [k for k, (_, a) in enumerate(pieces) if not is_silent(a)]
    decoded: list[ChunkTranscript] = []
    for i in range(0, len(audible), batch_size):
        group = [pieces[k][1] for k in audible[i : i + batch_size]]
        decoded += engine.transcribe(engine.features(group), [None] * len(group), [len(a) / SAMPLE_RATE for a in group])
    results = [NOTHING] * len(pieces)
    for k, r in zip(audible, decoded):
        results[k] = r
    transcript = merge_file([c for c, _ in pieces], results, engine.text)
    return transcript.text, transcript.segments
