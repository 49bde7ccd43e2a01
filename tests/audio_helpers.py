"""Build audio files of every format the tool reads from one real recording, at test time.

Only tests/data/jfk.flac is committed; mp3, ogg/opus, m4a, mp4 and webm versions of it (and stereo,
44.1/48 kHz variants) are written by `encode` into a tmp folder with PyAV, so a test can check decoding of
each format without big binary fixtures. `load_samples` reads a file with PyAV at its native rate and
channel count and `resample` is a plain-numpy band-limited resampler, so reference signals do not go
through the code under test.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

DATA = Path(__file__).parent / "data"
JFK = DATA / "jfk.flac"

# extension -> (container format, audio encoder, video encoder or None)
FORMATS: dict[str, tuple[str, str, str | None]] = {
    ".wav": ("wav", "pcm_s16le", None),
    ".flac": ("flac", "flac", None),
    ".mp3": ("mp3", "libmp3lame", None),
    ".ogg": ("ogg", "libopus", None),
    ".opus": ("ogg", "libopus", None),
    ".m4a": ("ipod", "aac", None),
    ".mp4": ("mp4", "aac", "mpeg4"),
    ".webm": ("webm", "libopus", "libvpx"),
}


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


def load_samples(path: str | Path) -> tuple[np.ndarray, int]:
    """A file's first audio stream at its own rate: float32 array (channels, n) and the rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        planes = [frame.to_ndarray() for frame in container.decode(stream)]
        rate = stream.rate
    out = np.concatenate(planes, axis=1)
    kind = planes[0].dtype
    if np.issubdtype(kind, np.integer):  # s16/s32 -> [-1, 1)
        out = out.astype(np.float64) / float(np.iinfo(kind).max + 1)
    if out.shape[0] == 1 and stream.format.is_packed and stream.channels > 1:  # packed: interleaved
        out = out.reshape(-1, stream.channels).T
    return np.ascontiguousarray(out, dtype=np.float32), rate


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal by truncating/zero-padding its spectrum (numpy only)."""
    if src_rate == dst_rate:
        return x.astype(np.float32)
    n_out = int(round(x.size * dst_rate / src_rate))
    spectrum = np.fft.rfft(x.astype(np.float64))
    keep = n_out // 2 + 1
    if keep <= spectrum.size:
        spectrum = spectrum[:keep]
    else:
        spectrum = np.concatenate([spectrum, np.zeros(keep - spectrum.size, spectrum.dtype)])
    return (np.fft.irfft(spectrum, n_out) * (n_out / x.size)).astype(np.float32)


def encode(
    samples: np.ndarray,
    sample_rate: int,
    path: str | Path,
    codec: str | None = None,
    container: str | None = None,
    *,
    video: str | None | bool = True,
    bit_rate: int | None = None,
) -> Path:
    """Write float samples (n,) mono or (channels, n) as an audio file with PyAV; returns the path.

    `codec` and `container` default from the extension (FORMATS). `video` adds a tiny 32x32, 10 fps video
    stream with the given encoder (True: the FORMATS default for that extension, False/None: audio only),
    so .mp4/.webm files are real video files whose audio track must be found. The encoder resamples to a
    rate it supports (e.g. Opus always gets 48 kHz) and converts the sample format as needed.
    """
    path = Path(path)
    default_container, default_codec, default_video = FORMATS.get(path.suffix.lower(), (None, None, None))
    codec = codec or default_codec
    container = container or default_container
    if codec is None or container is None:
        raise ValueError(f"no codec/container known for {path.name}; pass them")
    video_codec = default_video if video is True else (video or None)

    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    channels = x.shape[0]
    layout = {1: "mono", 2: "stereo"}[channels]

    rates = av.codec.Codec(codec, "w").audio_rates
    rate = sample_rate if not rates or sample_rate in rates else (48_000 if 48_000 in rates else max(rates))

    with av.open(str(path), mode="w", format=container) as out:
        vstream = None
        if video_codec:  # added first, so the audio is not stream 0 and must be looked for
            vstream = out.add_stream(video_codec, rate=10)
            vstream.width = vstream.height = 32
            vstream.pix_fmt = "yuv420p"
        astream = out.add_stream(codec, rate=rate, layout=layout)
        if bit_rate:
            astream.bit_rate = bit_rate

        block = 1024
        for start in range(0, x.shape[1], block):
            chunk = np.ascontiguousarray(x[:, start : start + block])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = sample_rate
            frame.pts = start
            frame.time_base = Fraction(1, sample_rate)
            out.mux(astream.encode(frame))
        out.mux(astream.encode(None))

        if vstream is not None:
            n_frames = max(1, int(np.ceil(x.shape[1] / sample_rate * 10)))
            for i in range(n_frames):
                img = np.full((32, 32, 3), (i * 7) % 256, dtype=np.uint8)
                vframe = av.VideoFrame.from_ndarray(img, format="rgb24")
                vframe.pts = i
                out.mux(vstream.encode(vframe))
            out.mux(vstream.encode(None))
    return path


def video_only(path: str | Path, seconds: float = 1.0, codec: str = "mpeg4", container: str = "mp4") -> Path:
    """A real video file with no audio stream at all."""
    path = Path(path)
    with av.open(str(path), mode="w", format=container) as out:
        vstream = out.add_stream(codec, rate=10)
        vstream.width = vstream.height = 32
        vstream.pix_fmt = "yuv420p"
        for i in range(max(1, int(seconds * 10))):
            vframe = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 20 % 256, np.uint8), format="rgb24")
            vframe.pts = i
            out.mux(vstream.encode(vframe))
        out.mux(vstream.encode(None))
    return path


def wav_header_only(path: str | Path, sample_rate: int = 16_000, channels: int = 1) -> Path:
    """A valid 44-byte PCM WAV file whose data chunk is empty: an audio stream with zero samples."""
    import struct

    byte_rate = sample_rate * channels * 2
    header = b"RIFF" + struct.pack("<I", 36) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, byte_rate, channels * 2, 16)
    header += b"data" + struct.pack("<I", 0)
    path = Path(path)
    path.write_bytes(header)
    return path


def aligned_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 2_000) -> tuple[float, int]:
    """Best Pearson correlation of a and b over lags in [-max_lag, max_lag] (codecs delay the signal);
    returns (correlation, lag) where a[lag:] lines up with b."""
    n = min(a.size, b.size) - 2 * max_lag
    if n <= 0:
        raise ValueError("signals too short for the lag range")
    # coarse FFT cross-correlation to find the lag, then an exact Pearson at that lag
    size = 1 << int(np.ceil(np.log2(a.size + b.size)))
    xc = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    lags = np.concatenate([np.arange(0, max_lag + 1), np.arange(-max_lag, 0)])
    values = np.concatenate([xc[: max_lag + 1], xc[-max_lag:]])
    lag = int(lags[np.argmax(values)])
    if lag >= 0:
        sa, sb = a[lag:], b
    else:
        sa, sb = a, b[-lag:]
    m = min(sa.size, sb.size)
    return float(np.corrcoef(sa[:m], sb[:m])[0, 1]), lag
