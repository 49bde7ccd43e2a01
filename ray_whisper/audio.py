"""Audio constants, fetching bytes through fsspec, and streaming decode with PyAV.

Decoding is a generator of mono 16 kHz float32 pieces, so that a caller can cut windows as audio arrives
and never hold more than a window or two of a long file in memory.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np

# Whisper's input geometry (openai/whisper audio.py): everything below derives from these three.
SAMPLE_RATE = 16_000  # Hz
N_FFT = 400  # 25 ms STFT window
HOP_LENGTH = 160  # 10 ms between mel frames
CHUNK_LENGTH_S = 30  # the encoder sees exactly 30 s
N_SAMPLES = CHUNK_LENGTH_S * SAMPLE_RATE  # 480,000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000 mel frames per window
SECONDS_PER_TOKEN = 0.02  # one timestamp token = 2 mel frames after the conv stride of 2


class AudioError(Exception):
    """A per-file failure that becomes that file's error row; `kind` is the short label in the summary."""

    kind = "audio_error"


class FetchError(AudioError):
    """The bytes could not be read: missing object, denied access, unreachable store."""

    kind = "fetch_error"


class DecodeError(AudioError):
    """The bytes are not decodable audio (corrupt, truncated header, not a media file)."""

    kind = "decode_error"


class NoAudioError(AudioError):
    """The container decodes but holds no audio stream or no samples."""

    kind = "no_audio"


def fetch_bytes(uri: str, filesystem: Any = None) -> bytes:
    """Read a whole object. `filesystem` is the run's fsspec filesystem for the URI's protocol (shared
    options on driver and workers) or None to let fsspec pick one. Errors become FetchError, cause chained."""
    import fsspec

    from .storage import redact, strip

    try:
        if filesystem is not None:
            with filesystem.open(strip(uri, filesystem), "rb") as f:
                return f.read()
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise FetchError(f"not found: {uri}") from e
    except PermissionError as e:
        raise FetchError(f"access denied: {uri}") from e
    except IsADirectoryError as e:
        raise FetchError(f"is a directory, not an audio file: {uri}") from e
    except Exception as e:  # network and store errors vary by backend; keep the reason on one line
        raise FetchError(f"could not read {uri}: {type(e).__name__}: {redact(_one_line(e))}") from e


def decode_stream(data: bytes, *, piece_samples: int = N_SAMPLES) -> Iterator[np.ndarray]:
    """Decode any container PyAV reads, downmixed to mono and resampled to 16 kHz.

    Yields float32 arrays of about `piece_samples` samples (the last may be shorter). Raises DecodeError or
    NoAudioError; a stream that breaks part-way raises DecodeError after yielding what decoded cleanly, and
    the caller decides what to keep.
    """
    import av

    if not data:
        raise NoAudioError("empty file (0 bytes)")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as e:
        raise DecodeError(f"not a readable audio/video container: {_one_line(e)}") from e
    with container:
        if not container.streams.audio:
            raise NoAudioError("the file has no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        pending: list[np.ndarray] = []
        pending_len = 0
        total = 0
        error: av.error.FFmpegError | None = None
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pending.append(out.to_ndarray().reshape(-1))
                    pending_len += pending[-1].size
                if pending_len >= piece_samples:
                    piece = np.concatenate(pending)
                    pending, pending_len = [], 0
                    total += piece.size
                    yield piece
            for out in resampler.resample(None):
                pending.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            error = e  # yield what decoded cleanly before the break (still pending), then raise
        if pending:
            piece = np.concatenate(pending)
            total += piece.size
            if piece.size:
                yield piece
        if error is not None:
            raise DecodeError(f"audio stream is corrupt after {total / SAMPLE_RATE:.1f} s: {_one_line(error)}") from error
        if total == 0:
            raise NoAudioError("the audio stream holds no samples")


def decode_all(data: bytes) -> np.ndarray:
    """The whole file as one float32 array (tests and benchmarks; the pipeline streams)."""
    return np.concatenate(list(decode_stream(data)))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__
