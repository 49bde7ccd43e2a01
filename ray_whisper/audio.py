"""Fetching bytes through fsspec, and streaming decode with PyAV.

Decoding is a generator of mono 16 kHz float32 pieces, so that a caller can cut windows as audio arrives
and never hold more than a window or two of a long file in memory.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import numpy as np

from .constants import N_SAMPLES, SAMPLE_RATE
from .errors import DecodeError, FetchError, FileError, NoAudioError, one_line, redact
from .storage import strip

@contextmanager
def _fetch_errors(uri: str) -> Iterator[None]:
    """Translate storage exceptions into FetchError with a one-line, secret-free reason."""
    try:
        yield
    except FileError:
        raise
    except FileNotFoundError as e:
        raise FetchError(f"not found: {redact(uri)}") from e
    except PermissionError as e:
        raise FetchError(f"access denied: {redact(uri)}") from e
    except IsADirectoryError as e:
        raise FetchError(f"is a directory, not an audio file: {redact(uri)}") from e
    except Exception as e:  # network and store errors vary by backend; keep the reason on one line
        raise FetchError(f"could not read {redact(uri)}: {type(e).__name__}: {one_line(redact(str(e)))}") from e


def _open(uri: str, filesystem: Any) -> tuple[Any, int]:
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
        raise DecodeError(f"not a readable audio/video container: {one_line(e)}") from e
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
            raise DecodeError(f"audio stream is corrupt after {total / SAMPLE_RATE:.1f} s: {one_line(error)}") from error
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
