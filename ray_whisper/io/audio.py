"""Fetching bytes through fsspec, and streaming decode with PyAV.

Decoding is a generator of mono 16 kHz float32 pieces, so that a caller can cut windows as audio arrives
and never hold more than a window or two of a long file in memory.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import fsspec
import numpy as np

from ..constants import N_SAMPLES, SAMPLE_RATE
from ..errors import DecodeError, FetchError, FileError, NoAudioError, TruncatedError, one_line, redact
from . import tracks
from .storage import BACKOFF_S, FETCH_ATTEMPTS, http_failure, network_failure, public_uri, strip

T = TypeVar("T")

# Decoded audio this much shorter than its container declares is a cut file (codec padding is milliseconds)
SHORT_BY_S = 1.0

@contextmanager
def _fetch_errors(uri: str) -> Iterator[None]:
    """Translate storage exceptions into FetchError with a one-line, secret-free reason; a timeout, a failed
    connection, a 5xx or a 429 is marked transient (tried again)."""
    try:
        yield
    except FileError:
        raise
    except Exception as e:
        raise _fetch_error(uri, e) from e


def _fetch_error(uri: str, e: BaseException) -> FetchError:
    where = public_uri(uri)
    network = network_failure(e)
    if network:  # before FileNotFoundError: fsspec's HTTP filesystem reports a dead server as "not found"
        error = FetchError(f"{network}: {where} ({type(e).__name__}; the timeout is --fetch-timeout-s)")
        error.transient = True
        return error
    answer = http_failure(e)  # before FileNotFoundError too: fsspec reports a 503 or a redirect loop as "not found"
    if answer:
        reason, transient = answer
        error = FetchError(f"{reason}: {where}")
        error.transient = transient
        return error
    if isinstance(e, FileNotFoundError):
        return FetchError(f"not found: {where}")
    if isinstance(e, PermissionError):
        return FetchError(f"access denied: {where}")
    if isinstance(e, IsADirectoryError):
        return FetchError(f"is a directory, not an audio file: {where}")
    # network and store errors vary by backend; keep the reason on one line
    return FetchError(f"could not read {where}: {type(e).__name__}: {one_line(redact(str(e)))}")


def _retrying(call: Callable[[], T], uri: str) -> T:
    """`call()`, tried again with backoff while it fails transiently (storage.FETCH_ATTEMPTS in all)."""
    delay = BACKOFF_S
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        try:
            with _fetch_errors(uri):
                return call()
        except FetchError as e:
            if not e.transient or attempt == FETCH_ATTEMPTS:
                raise
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _open(uri: str, filesystem: Any) -> tuple[Any, int]:
    def attempt() -> tuple[Any, int]:
        fs, path = fsspec.core.url_to_fs(uri) if filesystem is None else (filesystem, strip(uri, filesystem))
        # info, not isdir: on S3 isdir lists the bucket, which a reader with only s3:GetObject may not do
        info = fs.info(path)
        if info.get("type") == "directory":
            raise IsADirectoryError(path)
        f = fs.open(path, "rb")
        size = getattr(f, "size", None)
        return f, (info.get("size") if size is None else size)

    return _retrying(attempt, uri)


def fetch_bytes(uri: str, filesystem: Any = None) -> bytes:
    """Read a whole object. `filesystem` is the run's fsspec filesystem for the URI's protocol (shared
    options on driver and workers) or None to let fsspec pick one. Errors become FetchError, cause chained."""
    f, _ = _open(uri, filesystem)
    with f:
        return _Stream(f, uri).read_all()


@contextmanager
def open_audio(uri: str, filesystem: Any = None) -> Iterator[Any]:
    """A seekable binary file object for the URI, read lazily (block by block on object stores), so a long
    file is never held in memory whole. A missing or denied object raises FetchError, an empty one
    NoAudioError."""
    f, size = _open(uri, filesystem)
    with f:
        if size == 0:
            raise NoAudioError("empty file (0 bytes)")
        yield _Stream(f, uri)


def decode_stream(
    source: bytes | Any, *, piece_samples: int = N_SAMPLES, track: int | None = None, notes: list[str] | None = None,
) -> Iterator[np.ndarray]:
    """Decode one audio track of any container PyAV reads (bytes, or a seekable binary file object), downmixed
    to mono and resampled to 16 kHz.

    `track`: the audio track to decode, counting audio streams from 0; None: the one flagged default, else
    the first (io.tracks). A file with more than one audio track appends its warnings to `notes`: the tracks
    left out, and whether the decoded one is silent while another is not.

    Yields float32 arrays of about `piece_samples` samples (the last may be shorter). Raises DecodeError or
    NoAudioError (a `track` the file lacks is a DecodeError); a stream that breaks part-way raises DecodeError
    after yielding what decoded cleanly, and one that ends more than SHORT_BY_S before the length its container
    declares raises TruncatedError ("decoded X s of Y s") after yielding all of it; the caller decides what to
    keep.
    """
    import av

    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise NoAudioError("empty file (0 bytes)")
        source = io.BytesIO(source)
    elif not isinstance(source, _Stream):
        source = _Stream(source, "")
    wav_s = _wav_header_seconds(source)
    try:
        container = av.open(source, mode="r")
    except Exception as e:
        if getattr(source, "failure", None) is not None:  # the bytes stopped coming: not the file's fault
            raise source.failure from e
        raise DecodeError(f"not a readable audio/video container: {one_line(e)}") from e
    with container:
        audio = container.streams.audio
        if not audio:
            raise NoAudioError("the file has no audio stream")
        chosen = tracks.choose(audio, track)
        stream = audio[chosen]
        listener = tracks.Listener({s.index: k for k, s in enumerate(audio)}, chosen) if len(audio) > 1 else None
        notes = notes if notes is not None else []
        notes.extend(filter(None, [tracks.extra_note(audio, chosen)]))
        declared = wav_s or _declared_seconds(container, stream)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        pending: list[np.ndarray] = []
        pending_len = 0
        total = 0
        error: av.error.FFmpegError | None = None
        try:
            for frame in _frames(container, stream, listener):
                for out in resampler.resample(frame):
                    pending.append(out.to_ndarray().reshape(-1))
                    pending_len += pending[-1].size
                    if listener is not None:
                        listener.hear(pending[-1])
                if pending_len >= piece_samples:
                    piece = np.concatenate(pending)
                    pending, pending_len = [], 0
                    total += piece.size
                    yield piece
            for out in resampler.resample(None):
                pending.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            error = e  # yield what decoded cleanly before the break (still pending), then raise
        if listener is not None:
            notes.extend(listener.notes())
        if pending:
            piece = np.concatenate(pending)
            total += piece.size
            if piece.size:
                yield piece
        failure = getattr(source, "failure", None)
        if failure is not None:  # the bytes stopped coming, the file is not broken: a fetch error, whatever PyAV said
            raise failure
        decoded = _decoded(total / SAMPLE_RATE, declared)
        if error is not None:
            raise DecodeError(f"{decoded}, then the audio stream is corrupt: {one_line(error)}") from error
        if total == 0:
            raise NoAudioError("the audio stream holds no samples")
        if declared is not None and declared - total / SAMPLE_RATE > SHORT_BY_S:
            raise TruncatedError(decoded)


def _frames(container: Any, stream: Any, listener: tracks.Listener | None) -> Iterator[Any]:
    """The frames of `stream`; the packets of the file's other audio tracks go to `listener` on the way, until
    it has heard enough, and from there the demuxer reads `stream` alone (from where it is)."""
    if listener is not None:
        for packet in container.demux(*container.streams.audio):
            if packet.stream.index == stream.index:
                yield from packet.decode()
            else:
                listener.listen(packet)
            if listener.done:
                break
        else:
            return
    yield from container.decode(stream)


def _decoded(seconds: float, declared: float | None) -> str:
    return f"decoded {seconds:.1f} s" + (f" of {declared:.1f} s" if declared else "")


def _declared_seconds(container: Any, stream: Any) -> float | None:
    """The audio stream's length as its container declares it (FLAC's STREAMINFO, an mp3's Xing header, an
    mp4's index), or None where FFmpeg only estimated it from the file's size and bit rate: an estimate from
    the size cannot show that bytes are missing, and from a VBR mp3's first frame it can be far too long."""
    import av

    if stream.duration is not None and stream.time_base is not None:
        declared = float(stream.duration * stream.time_base)
    elif container.duration is not None and len(container.streams) == 1:  # not a video's length: its audio may end first
        declared = container.duration / av.time_base
    else:
        return None
    bit_rate = sum(s.bit_rate or 0 for s in container.streams)
    size = container.size
    if bit_rate > 0 and size > 0 and abs(declared - size * 8 / bit_rate) <= max(0.5, 0.02 * declared):
        return None
    return declared


def _wav_header_seconds(f: Any) -> float | None:
    """The length a WAV header declares (its data chunk's size over the byte rate), or None for any other file.
    FFmpeg trusts the file's size over a header that claims more, so a WAV cut short would decode as whole."""
    try:
        f.seek(0)
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        byte_rate = 0
        for _ in range(32):  # the chunks before 'data': fmt, LIST, fact, ...
            header = f.read(8)
            if len(header) < 8:
                return None
            name, size = header[:4], int.from_bytes(header[4:], "little")
            if name == b"data":  # 0 or 0xFFFFFFFF: a writer that did not know the length
                return size / byte_rate if byte_rate and 0 < size < 0xFFFFFFFF else None
            body = f.read(16) if name == b"fmt " else b""
            if len(body) >= 12:
                byte_rate = int.from_bytes(body[8:12], "little")
            f.seek(size + (size & 1) - len(body), 1)
        return None
    finally:
        f.seek(0)


class _Stream(io.RawIOBase):
    """A read-only view of a remote file object for PyAV: without its name (PyAV would otherwise trust the
    extension: "notes.txt renamed .flac" decodes as an empty FLAC stream instead of being probed), and with
    reads that are tried again after a timeout or a dropped connection. A read that fails for good ends the
    stream and is kept in `failure` (a FetchError), so the file becomes a fetch_error row, not a corrupt one."""

    def __init__(self, f: Any, uri: str):
        self._f = f
        self._uri = uri
        self.failure: FetchError | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.failure is not None:
            return b""
        position = self._f.tell()

        def attempt() -> bytes:
            self._f.seek(position)
            return self._f.read(n)

        try:
            return _retrying(attempt, self._uri)
        except FetchError as e:
            self.failure = e
            return b""

    def read_all(self) -> bytes:
        data = self.read()
        if self.failure is not None:
            raise self.failure
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


def decode_all(data: bytes, track: int | None = None, notes: list[str] | None = None) -> np.ndarray:
    """The whole file (its audio track `track`, warnings into `notes`: see decode_stream) as one float32 array
    (the endpoint's uploads, tests and benchmarks; the pipeline streams)."""
    return np.concatenate(list(decode_stream(data, track=track, notes=notes)))
