"""Audio constants, fetching bytes through fsspec, and streaming decode with PyAV.

Decoding is a generator of mono 16 kHz float32 pieces, so that a caller can cut windows as audio arrives
and never hold more than a window or two of a long file in memory.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
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


def _fetch_errors(uri: str):
    """Translate storage exceptions into FetchError with a one-line, secret-free reason."""
    from contextlib import contextmanager

    from .storage import redact

    @contextmanager
    def guard():
        try:
            yield
        except AudioError:
            raise
        except FileNotFoundError as e:
            raise FetchError(f"not found: {redact(uri)}") from e
        except PermissionError as e:
            raise FetchError(f"access denied: {redact(uri)}") from e
        except IsADirectoryError as e:
            raise FetchError(f"is a directory, not an audio file: {redact(uri)}") from e
        except Exception as e:  # network and store errors vary by backend; keep the reason on one line
            raise FetchError(f"could not read {redact(uri)}: {type(e).__name__}: {redact(_one_line(e))}") from e

    return guard()


def _open(uri: str, filesystem: Any) -> tuple[Any, int]:
    import fsspec

    from .storage import strip

    with _fetch_errors(uri):
        if filesystem is None:
            filesystem, path = fsspec.core.url_to_fs(uri)
        else:
            path = strip(uri, filesystem)
        # info, not isdir: on S3 isdir lists the bucket, which a reader with only s3:GetObject may not do
        if filesystem.info(path).get("type") == "directory":
            raise IsADirectoryError(path)
        f = filesystem.open(path, "rb")
        size = getattr(f, "size", None)
        return f, filesystem.size(path) if size is None else size


def fetch_bytes(uri: str, filesystem: Any = None) -> bytes:
    """Read a whole object. `filesystem` is the run's fsspec filesystem for the URI's protocol (shared
    options on driver and workers) or None to let fsspec pick one. Errors become FetchError, cause chained."""
    f, _ = _open(uri, filesystem)
    with f, _fetch_errors(uri):
        return f.read()


@contextmanager
def open_audio(uri: str, filesystem: Any = None) -> Iterator[Any]:
    """A seekable binary file object for the URI, read lazily (block by block on object stores), so a long
    file is never held in memory whole. A missing or denied object raises FetchError, an empty one
    NoAudioError."""
    f, size = _open(uri, filesystem)
    with f:
        if size == 0:
            raise NoAudioError("empty file (0 bytes)")
        yield f


def decode_stream(source: bytes | Any, *, piece_samples: int = N_SAMPLES) -> Iterator[np.ndarray]:
    """Decode any container PyAV reads (bytes, or a seekable binary file object), downmixed to mono and
    resampled to 16 kHz.

    Yields float32 arrays of about `piece_samples` samples (the last may be shorter). Raises DecodeError or
    NoAudioError; a stream that breaks part-way raises DecodeError after yielding what decoded cleanly, and
    the caller decides what to keep.
    """
    import av

    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise NoAudioError("empty file (0 bytes)")
        source = io.BytesIO(source)
    else:
        source = _Anonymous(source)
    try:
        container = av.open(source, mode="r")
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


class _Anonymous(io.RawIOBase):
    """A read-only view of a file object without its name: PyAV would otherwise trust the extension
    ("notes.txt renamed .flac" decodes as an empty FLAC stream) instead of probing the bytes."""

    def __init__(self, f: Any):
        self._f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


def decode_all(data: bytes) -> np.ndarray:
    """The whole file as one float32 array (tests and benchmarks; the pipeline streams)."""
    return np.concatenate(list(decode_stream(data)))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__
