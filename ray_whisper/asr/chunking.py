"""Where to cut a file into Whisper's 30-second chunks: pure functions on sample arrays, no I/O.

A chunk is at most 30 s. Rather than cutting blindly every 30 s (a chunk that starts mid-word makes
Whisper stop after a token or two), each cut goes at the quietest 100 ms in the last `search` seconds of
the chunk. When that point is a real pause, neighbouring chunks share nothing (strides 0) and their
transcripts simply concatenate. When there is no pause (music, crosstalk, a speaker who never breathes),
the cut falls inside sound and the two chunks overlap by `stride` samples on each side of the cut, so
that `merge.py` can stitch the tokens the two chunks heard twice.

Geometry uses the transformers ASR pipeline's convention: a chunk spans [start, end); its first
`stride_left` and last `stride_right` samples are shared with the neighbours; what it alone owns is
[start + stride_left, end - stride_right). Owned spans tile the file exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..config import ChunkOptions
from ..constants import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE

ENERGY_FRAME = HOP_LENGTH  # 10 ms frames for the loudness profile
PAUSE_FRAMES = 10  # a pause is judged over 100 ms: shorter dips happen inside words
LOUDNESS_FLOOR_DB = -80.0  # digital silence has -inf dB; clamp so arithmetic stays finite
SILENT_CHUNK_DB = -60.0  # a chunk whose loudest 100 ms stays below this holds nothing audible


@dataclass(frozen=True)
class ChunkGeometry:
    """Chunk geometry in samples at 16 kHz."""

    length: int = N_SAMPLES  # longest chunk; the encoder's input length
    search: int = 8 * SAMPLE_RATE  # the cut is searched in the last `search` samples of a chunk
    stride: int = 0  # overlap on each side of a cut that found no pause (0: none)
    pause_db: float = 20.0  # a pause is this far below the chunk's speech level (90th percentile)

    def __post_init__(self) -> None:
        if self.length <= 0:
            raise ValueError("length must be positive")
        if not 0 < self.search < self.length:
            raise ValueError("search must be positive and shorter than the length")
        if self.stride < 0 or 4 * self.stride >= self.length - self.search:
            # 2 strides on each side of a chunk still leave it a non-empty owned span before the search zone
            raise ValueError("stride must be >= 0 and 4 * stride shorter than length - search")

    @classmethod
    def from_seconds(cls, chunk_length_s: float, stride_length_s: float, search_s: float | None = None) -> "ChunkGeometry":
        length = round(chunk_length_s * SAMPLE_RATE)
        search = round((search_s if search_s is not None else min(8.0, chunk_length_s / 3)) * SAMPLE_RATE)
        return cls(length=length, search=search, stride=round(stride_length_s * SAMPLE_RATE))

    @classmethod
    def of(cls, options: ChunkOptions) -> "ChunkGeometry":
        """The chunk options (--chunk-length-s, ...) in samples."""
        return cls.from_seconds(options.chunk_length_s, options.stride_length_s, options.search_length_s)


@dataclass(frozen=True)
class Chunk:
    """One chunk of a file, in samples from the start of the file."""

    index: int
    start: int
    end: int
    stride_left: int
    stride_right: int
    is_last: bool

    @property
    def owned(self) -> tuple[int, int]:
        return self.start + self.stride_left, self.end - self.stride_right


def loudness_db(audio: np.ndarray) -> np.ndarray:
    """Loudness of each 10 ms frame in dB (full scale = 0), averaged over a 100 ms neighbourhood."""
    n = audio.size // ENERGY_FRAME
    if n == 0:
        return np.full(1, LOUDNESS_FLOOR_DB)
    power = np.square(audio[: n * ENERGY_FRAME].astype(np.float64)).reshape(n, ENERGY_FRAME).mean(axis=1)
    k = min(PAUSE_FRAMES, n)
    smoothed = np.convolve(power, np.full(k, 1.0 / k), mode="same")
    return np.maximum(10.0 * np.log10(smoothed + 1e-12), LOUDNESS_FLOOR_DB)


def is_silent(chunk_audio: np.ndarray) -> bool:
    """Nothing audible in the chunk. Whisper invents text ("you") for digital silence with a no-speech
    probability that its own thresholds do not catch, so such chunks are not decoded at all."""
    return float(loudness_db(chunk_audio).max()) < SILENT_CHUNK_DB


def find_cut(chunk_audio: np.ndarray, geom: ChunkGeometry) -> tuple[int, bool]:
    """Where to end a full chunk: (offset into chunk_audio, whether it is a pause).

    `chunk_audio` is the chunk's samples (length geom.length). The cut is the centre of the quietest
    100 ms in the search zone; ties go to the latest frame so chunks stay long.
    """
    db = loudness_db(chunk_audio)
    zone_start = (geom.length - geom.search) // ENERGY_FRAME
    zone = db[zone_start:]
    if zone.size == 0:
        return geom.length, False
    best = zone.size - 1 - int(np.argmin(zone[::-1]))
    speech_level = float(np.percentile(db, 90))
    is_pause = zone[best] <= speech_level - geom.pause_db or zone[best] <= LOUDNESS_FLOOR_DB + 1
    cut = (zone_start + best) * ENERGY_FRAME + ENERGY_FRAME // 2
    return min(cut, geom.length), bool(is_pause)


def iter_chunks(pieces: Iterable[np.ndarray], geom: ChunkGeometry) -> Iterator[tuple[Chunk, np.ndarray]]:
    """Cut a stream of audio pieces into chunks as the audio arrives.

    Holds at most about one chunk plus one piece of audio, so memory does not grow with file length.
    Yields (chunk, its samples). An empty stream yields nothing.
    """
    buf = np.zeros(0, dtype=np.float32)
    buf_start = 0  # file position of buf[0]
    start, stride_left, index = 0, 0, 0

    def cut_full_chunks(final: bool) -> Iterator[tuple[Chunk, np.ndarray]]:
        nonlocal buf, buf_start, start, stride_left, index
        while buf_start + buf.size - start > geom.length:
            local = start - buf_start
            offset, is_pause = find_cut(buf[local : local + geom.length], geom)
            if is_pause or geom.stride == 0:
                end, stride_right, next_start = start + offset, 0, start + offset
            else:
                end = min(start + offset + geom.stride, start + geom.length)
                stride_right = geom.stride
                next_start = end - 2 * geom.stride
            chunk = Chunk(index, start, end, stride_left, stride_right, False)
            yield chunk, buf[local : local + (end - start)].copy()
            index += 1
            start, stride_left = next_start, stride_right
            buf = buf[start - buf_start :]
            buf_start = start
        if final and buf_start + buf.size > start:
            end = buf_start + buf.size
            yield Chunk(index, start, end, stride_left, 0, True), buf[start - buf_start :].copy()

    for piece in pieces:
        if piece.size:
            buf = np.concatenate([buf, piece.astype(np.float32, copy=False)])
            yield from cut_full_chunks(final=False)
    yield from cut_full_chunks(final=True)


def plan_chunks(audio: np.ndarray, geom: ChunkGeometry) -> list[Chunk]:
    """The chunks of a whole in-memory file (tests and the benchmark's engine ceiling)."""
    return [c for c, _ in iter_chunks([audio], geom)]


def chunk_seed(source: str, index: int) -> int:
    """The sampling seed of a file's chunk (`source` names the file): the same on every run and in every batch."""
    return int.from_bytes(hashlib.sha256(f"{source}\0{index}".encode()).digest()[:4], "little")
