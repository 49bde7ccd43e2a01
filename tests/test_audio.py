"""Tests for ray_whisper.io.audio: fetching bytes and decoding every promised format to mono 16 kHz float32.

The formats are made at test time from the committed recording tests/data/jfk.flac (44.1 kHz stereo,
11 s) with PyAV (tests/audio_helpers.py). Reference signals are computed with numpy (channel mean and an
FFT resampler), not with the code under test.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from audio_helpers import (  # noqa: E402
    JFK,
    aligned_correlation,
    encode,
    has_encoder,
    load_samples,
    resample,
    video_only,
    wav_header_only,
)

from ray_whisper.io.audio import decode_all, decode_stream, fetch_bytes  # noqa: E402
from ray_whisper.constants import N_SAMPLES, SAMPLE_RATE  # noqa: E402
from ray_whisper.errors import DecodeError, FetchError, NoAudioError, TruncatedError  # noqa: E402
from ray_whisper.errors import FileError as AudioError  # noqa: E402  (the per-file base)

TOLERANCE = int(0.050 * SAMPLE_RATE)  # codecs pad the start/end by up to a frame or two
MAX_FRAME = 4096  # a piece may overshoot piece_samples by at most one decoded frame (at 16 kHz)


@pytest.fixture(scope="module")
def source() -> tuple[np.ndarray, int]:
    """The recording as stored: (channels, n) float32 and its rate."""
    return load_samples(JFK)


@pytest.fixture(scope="module")
def ref16(source) -> np.ndarray:
    """What the decoder should produce: channel mean, resampled to 16 kHz, computed independently."""
    samples, rate = source
    return resample(samples.mean(axis=0), rate, SAMPLE_RATE)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audio")


@pytest.fixture(scope="module")
def made(workdir, ref16):
    """encode once per (name) and reuse: made('jfk.mp3') -> path of the 16 kHz mono speech as mp3."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = encode(ref16, SAMPLE_RATE, workdir / name)
        return cache[name]

    return get


def _check_speech(out: np.ndarray, ref: np.ndarray, min_corr: float = 0.98) -> None:
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.ndim == 1
    assert abs(out.size - ref.size) <= TOLERANCE, f"{out.size} samples vs {ref.size} expected"
    assert np.isfinite(out).all()
    corr, lag = aligned_correlation(out, ref)
    assert corr > min_corr, f"decoded audio does not match the source (r={corr:.3f}, lag={lag})"
    assert abs(lag) <= TOLERANCE


def test_reference_is_the_expected_recording(source, ref16):
    samples, rate = source
    assert (samples.shape[0], rate) == (2, 44_100)  # jfk.flac is stored as 44.1 kHz stereo
    assert ref16.size == 11 * SAMPLE_RATE
    assert 0.01 < float(np.sqrt(np.mean(ref16**2))) < 0.5  # real speech, not silence


# ---------------------------------------------------------------- every promised format

FORMATS = [
    pytest.param("jfk.wav", id="wav"),
    pytest.param("jfk.flac", id="flac"),
    pytest.param("jfk.mp3", id="mp3"),
    pytest.param("jfk.ogg", id="ogg-opus"),
    pytest.param("jfk.opus", id="opus"),
    pytest.param("jfk.m4a", id="m4a-aac"),
    pytest.param("jfk.mp4", id="mp4-video+aac"),
    pytest.param("jfk.webm", id="webm-vp8+opus"),
]


@pytest.mark.parametrize("name", FORMATS)
def test_decode_each_format(made, ref16, name):
    path = made(name)
    out = decode_all(path.read_bytes())
    _check_speech(out, ref16)


def test_video_containers_really_hold_video(made):
    import av

    for name, vcodec in [("jfk.mp4", "mpeg4"), ("jfk.webm", "vp8")]:
        with av.open(str(made(name))) as c:
            assert c.streams.video and c.streams.video[0].codec_context.name == vcodec
            assert c.streams[0].type == "video"  # the audio is not the first stream
            assert c.streams.audio


def test_committed_file_is_downmixed_and_resampled(ref16):
    # jfk.flac itself is 44.1 kHz stereo s32
    out = decode_all(JFK.read_bytes())
    _check_speech(out, ref16, min_corr=0.999)
    assert abs(out.size - ref16.size) <= 1


@pytest.mark.parametrize(
    "name,rate,channels",
    [
        ("s48.wav", 48_000, 2),
        ("s44.mp3", 44_100, 2),
        ("m44.mp3", 44_100, 1),
        ("s48.ogg", 48_000, 2),
        ("s48.m4a", 48_000, 2),
        ("s44.webm", 44_100, 2),
        ("m22.flac", 22_050, 1),
    ],
)
def test_other_rates_and_stereo_are_converted(workdir, source, ref16, name, rate, channels):
    samples, src_rate = source
    mono = samples.mean(axis=0)
    x = resample(mono, src_rate, rate)
    if channels == 2:
        x = np.stack([x, x])
    path = encode(x, rate, workdir / name)
    out = decode_all(path.read_bytes())
    _check_speech(out, ref16, min_corr=0.95)


def test_upsampled_from_8khz(workdir, ref16):
    narrow = resample(ref16, SAMPLE_RATE, 8_000)
    out = decode_all(encode(narrow, 8_000, workdir / "n8.wav").read_bytes())
    expected = resample(narrow, 8_000, SAMPLE_RATE)
    _check_speech(out, expected, min_corr=0.99)


def test_stereo_downmix_mixes_both_channels(workdir, source):
    samples, src_rate = source
    s = resample(samples.mean(axis=0), src_rate, 48_000) * 0.5
    rms = lambda a: float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))  # noqa: E731
    ref = resample(s, 48_000, SAMPLE_RATE)

    same = decode_all(encode(np.stack([s, s]), 48_000, workdir / "same.wav").read_bytes())
    _check_speech(same, ref, min_corr=0.999)
    # identical channels: mono is either channel, up to the +3 dB of libswresample's float stereo->mono
    # matrix (0.707 * (L + R), not normalised for float output; openai/whisper's s16 path gives 0.5 * (L + R))
    assert 0.95 < rms(same) / rms(ref) < 1.45

    left_only = decode_all(encode(np.stack([s, np.zeros_like(s)]), 48_000, workdir / "left.wav").read_bytes())
    _check_speech(left_only, ref, min_corr=0.999)
    assert 0.45 < rms(left_only) / rms(ref) < 0.75  # the silent channel is mixed in, not dropped

    opposite = decode_all(encode(np.stack([s, -s]), 48_000, workdir / "opposite.wav").read_bytes())
    assert abs(opposite.size - ref.size) <= TOLERANCE
    assert rms(opposite) < 0.01 * rms(ref)  # L + R cancel: not "take the left channel"


def test_sine_keeps_its_pitch(workdir):
    rate = 44_100
    t = np.arange(2 * rate) / rate
    tone = 0.5 * np.sin(2 * np.pi * 1_000 * t)
    out = decode_all(encode(np.stack([tone, tone]), rate, workdir / "tone.flac").read_bytes())
    assert abs(out.size - 2 * SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / out.size
    assert abs(peak_hz - 1_000) < 2


# ---------------------------------------------------------------- streaming pieces


@pytest.mark.parametrize("piece_samples", [1, 777, SAMPLE_RATE, N_SAMPLES])
@pytest.mark.parametrize("name", ["jfk.mp3", "jfk.webm"])
def test_stream_pieces_are_bounded_and_concatenate_to_decode_all(made, name, piece_samples):
    data = made(name).read_bytes()
    whole = decode_all(data)
    pieces = list(decode_stream(data, piece_samples=piece_samples))
    assert pieces, "no pieces"
    for p in pieces:
        assert p.dtype == np.float32 and p.ndim == 1 and p.size > 0
        assert p.size < piece_samples + MAX_FRAME, f"piece of {p.size} for piece_samples={piece_samples}"
    for p in pieces[:-1]:
        assert p.size >= piece_samples
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    if piece_samples >= whole.size:
        assert len(pieces) == 1
    else:
        assert len(pieces) >= whole.size // (piece_samples + MAX_FRAME)


def test_stream_of_native_flac_matches(ref16):
    data = JFK.read_bytes()
    pieces = list(decode_stream(data, piece_samples=SAMPLE_RATE))
    assert 10 <= len(pieces) <= 12
    np.testing.assert_array_equal(np.concatenate(pieces), decode_all(data))


def test_stream_is_lazy(made):
    """The first piece arrives before the rest of the file is decoded (generator, not a list)."""
    gen = decode_stream(made("jfk.wav").read_bytes(), piece_samples=SAMPLE_RATE)
    first = next(gen)
    assert SAMPLE_RATE <= first.size < SAMPLE_RATE + MAX_FRAME
    rest = sum(p.size for p in gen)
    assert rest > 9 * SAMPLE_RATE


# ---------------------------------------------------------------- bad inputs


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    assert len(message) < 400
    return message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    data = fetch_bytes(str(path))
    assert data == b""
    with pytest.raises(NoAudioError) as ei:
        decode_all(data)
    assert ei.value.kind == "no_audio"
    assert "empty" in _one_line_error(ei)


def test_random_bytes_named_mp3(tmp_path):
    path = tmp_path / "noise.mp3"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(AudioError) as ei:
        decode_all(fetch_bytes(str(path)))
    assert type(ei.value) is DecodeError and ei.value.kind == "decode_error"
    assert "not a readable audio/video container" in _one_line_error(ei)


def test_text_file_named_flac(tmp_path):
    path = tmp_path / "notes.flac"
    path.write_text("this is a shopping list, not audio\n" * 50)
    with pytest.raises(DecodeError) as ei:
        decode_all(fetch_bytes(str(path)))
    assert "not a readable" in _one_line_error(ei)


def test_wav_with_zero_samples(tmp_path):
    data = wav_header_only(tmp_path / "zero.wav").read_bytes()
    assert len(data) == 44
    with pytest.raises(NoAudioError) as ei:
        list(decode_stream(data))
    assert "no samples" in _one_line_error(ei)


def test_video_without_audio_stream(tmp_path):
    data = video_only(tmp_path / "silent_movie.mp4").read_bytes()
    with pytest.raises(NoAudioError) as ei:
        decode_all(data)
    assert "no audio stream" in _one_line_error(ei)


@pytest.mark.parametrize("name, says", [("jfk.mp3", True), ("jfk.wav", True), ("jfk.ogg", False), ("jfk.webm", False)])
def test_truncated_file_decodes_its_first_half(made, ref16, name, says):
    """The first half decodes; where the container declares the length (a WAV header, an mp3's Xing header),
    the stream then says how much is missing. Ogg and WebM carry no length that survives the cut."""
    data = made(name).read_bytes()
    got: list[np.ndarray] = []
    with pytest.raises(TruncatedError) if says else contextlib.nullcontext() as ei:
        got.extend(decode_stream(data[: len(data) // 2]))
    out = np.concatenate(got)
    assert 0.4 * ref16.size < out.size < 0.6 * ref16.size
    corr, lag = aligned_correlation(out, ref16[: out.size])
    assert corr > 0.98 and abs(lag) <= TOLERANCE
    if says:
        assert str(ei.value) == f"decoded {out.size / SAMPLE_RATE:.1f} s of 11.0 s"


def test_truncated_flac_yields_what_decoded_then_raises(made, ref16):
    """The last FLAC frame is cut mid-way: the decoder errors on it, but the audio before it must come out
    first (preprocess keeps a truncated upload's transcript), even though it is less than one piece."""
    data = made("jfk.flac").read_bytes()
    got: list[np.ndarray] = []
    with pytest.raises(DecodeError) as ei:
        for piece in decode_stream(data[: len(data) // 2]):
            got.append(piece)
    out = np.concatenate(got) if got else np.zeros(0, np.float32)
    assert 0.4 * ref16.size < out.size < 0.6 * ref16.size
    np.testing.assert_allclose(out, decode_all(data)[: out.size], atol=1e-6)
    message = _one_line_error(ei)
    seconds = float(re.search(r"decoded ([0-9.]+) s of 11.0 s, then the audio stream is corrupt: ", message).group(1))
    assert abs(seconds - out.size / SAMPLE_RATE) < 0.1


def test_truncated_flac_with_small_pieces_keeps_earlier_pieces(made):
    data = made("jfk.flac").read_bytes()
    got: list[np.ndarray] = []
    with pytest.raises(DecodeError):
        for piece in decode_stream(data[: len(data) // 2], piece_samples=SAMPLE_RATE):
            got.append(piece)
    assert sum(p.size for p in got) > 4 * SAMPLE_RATE


@pytest.mark.parametrize("name", ["jfk.m4a", "jfk.mp4"])
def test_truncated_mp4_without_index_is_a_decode_error(made, name):
    # the muxer writes the moov index at the end, so the first half is not an openable file
    data = made(name).read_bytes()
    with pytest.raises(DecodeError) as ei:
        decode_all(data[: len(data) // 2])
    _one_line_error(ei)


# ---------------------------------------------------------------- fetch_bytes


def test_fetch_bytes_reads_the_file(tmp_path):
    import fsspec

    expected = JFK.read_bytes()
    assert fetch_bytes(str(JFK)) == expected
    assert fetch_bytes(JFK.as_uri()) == expected  # file:// URI
    assert fetch_bytes(str(JFK), fsspec.filesystem("file")) == expected


def test_fetch_missing_path(tmp_path):
    missing = tmp_path / "nope" / "missing.mp3"
    with pytest.raises(FetchError) as ei:
        fetch_bytes(str(missing))
    assert ei.value.kind == "fetch_error"
    message = _one_line_error(ei)
    assert str(missing) in message and "not found" in message


def test_fetch_missing_path_with_filesystem(tmp_path):
    import fsspec

    missing = tmp_path / "missing.wav"
    with pytest.raises(FetchError) as ei:
        fetch_bytes(str(missing), fsspec.filesystem("file"))
    assert str(missing) in _one_line_error(ei)


def test_fetch_directory(tmp_path):
    with pytest.raises(FetchError) as ei:
        fetch_bytes(str(tmp_path))
    message = _one_line_error(ei)
    assert str(tmp_path) in message and "directory" in message


def test_error_kinds_are_distinct():
    kinds = {cls.kind for cls in (FetchError, DecodeError, NoAudioError)}
    assert kinds == {"fetch_error", "decode_error", "no_audio"}
    assert all(issubclass(cls, AudioError) for cls in (FetchError, DecodeError, NoAudioError))


def test_expected_encoders_present():
    # the format tests above depend on these; fail loudly rather than silently skip
    for name in ["libopus", "aac", "libmp3lame", "flac", "mpeg4", "libvpx"]:
        assert has_encoder(name), name
