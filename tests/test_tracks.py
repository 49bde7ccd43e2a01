"""Every extra audio track is named: a file with more than one audio track transcribes one (--audio-track N,
else the one flagged default, else the first) and its row says which were left out; a silent transcribed
track beside one with sound says so instead of being a quiet ""; a track the file lacks is that file's
decode_error row. Real multi-track mp4 (AAC) and mkv (Opus) files written here from jfk.flac: decode first,
then the CPU stage, then one run through Ray."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_whisper import schema
from ray_whisper.asr.chunking import ChunkGeometry
from ray_whisper.batch.cpu_stage import chunk_batch
from ray_whisper.config import TranscribeOptions
from ray_whisper.constants import SAMPLE_RATE
from ray_whisper.errors import DecodeError, TruncatedError
from ray_whisper.io.audio import decode_all, decode_stream

from audio_helpers import aligned_correlation, encode
from conftest import DATA, REFS, starlette_request

EXTRA_0 = "extra_tracks: transcribed audio track 0 of 2 (--audio-track N picks another), not 1 (spa)"
SILENT_0 = "silent_track: audio track 0 is silent (nothing above -60 dBFS) but track 1 has sound: --audio-track 1 transcribes it"


def multitrack(path: Path, tracks: list[np.ndarray], languages: list[str | None], *, codec: str = "aac",
               default: int | None = None, options: dict | None = None) -> Path:
    """A file with one mono audio track per array (16 kHz float samples), languages in the tracks' metadata,
    and, with `default`, that track alone flagged default (as a player would pick it)."""
    fmt = {".mp4": "mp4", ".mkv": "matroska"}[path.suffix]
    rate = 48_000 if codec == "libopus" else SAMPLE_RATE  # Opus encodes at 48 kHz only
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        streams = [out.add_stream(codec, rate=rate, layout="mono") for _ in tracks]
        for k, (stream, language) in enumerate(zip(streams, languages)):
            if language:
                stream.metadata["language"] = language
            if default is not None:
                stream.disposition = av.stream.Disposition.default if k == default else av.stream.Disposition(0)
        for stream, x in zip(streams, tracks):
            for start in range(0, x.size, 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, start : start + 1024]),
                                                   format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    return decode_all((DATA / "jfk.flac").read_bytes())  # 11.0 s


@pytest.fixture(scope="module")
def files(tmp_path_factory, jfk) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tracks")
    quiet = np.zeros_like(jfk)
    made = {
        "silent_first": multitrack(root / "silent_first.mp4", [quiet, jfk], ["eng", "spa"]),
        "three": multitrack(root / "three.mkv", [jfk, 0.5 * jfk, quiet], [None, "deu", "und"], codec="libopus"),
        "default_second": multitrack(root / "default_second.mkv", [quiet, jfk], ["eng", None], codec="libopus",
                                     default=1),
        "one": encode(jfk, SAMPLE_RATE, root / "one.mp4"),  # one audio track after a video stream
        "both_silent": multitrack(root / "both_silent.mp4", [quiet, quiet], [None, None]),
    }
    # moov first, so that a file cut in half still opens and declares its 11 s
    whole = multitrack(root / "whole.mp4", [quiet, jfk], ["eng", "spa"], options={"movflags": "faststart"})
    (root / "cut.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return made | {"cut": root / "cut.mp4"}


def decode(path: Path, track: int | None = None) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    return decode_all(path.read_bytes(), track, notes), notes


def test_the_default_track_is_the_first_and_the_others_are_named(files):
    audio, notes = decode(files["silent_first"])
    assert np.abs(audio).max() < 1e-3 and audio.size > 10.9 * SAMPLE_RATE  # track 0: the silent one
    assert notes == [EXTRA_0, SILENT_0]


def test_audio_track_picks_another_and_names_the_one_left(files, jfk):
    audio, notes = decode(files["silent_first"], track=1)
    assert aligned_correlation(audio, jfk)[0] > 0.95
    assert notes == ["extra_tracks: transcribed audio track 1 of 2 (--audio-track N picks another), not 0 (eng)"]


def test_a_track_flagged_default_is_the_default(files, jfk):
    audio, notes = decode(files["default_second"])
    assert aligned_correlation(audio, jfk)[0] > 0.95
    assert notes == ["extra_tracks: transcribed audio track 1 of 2 (--audio-track N picks another), not 0 (eng)"]


def test_no_silent_warning_when_the_transcribed_track_has_sound_or_none_has(files):
    _, notes = decode(files["three"])  # track 0 speaks; "und" is no language
    assert notes == ["extra_tracks: transcribed audio track 0 of 3 (--audio-track N picks another), not 1 (deu), 2"]
    _, notes = decode(files["three"], track=2)  # silent, beside two that speak
    assert notes[1] == ("silent_track: audio track 2 is silent (nothing above -60 dBFS) but tracks 0, 1 have "
                        "sound: --audio-track 0 transcribes it")
    _, notes = decode(files["both_silent"])
    assert notes == ["extra_tracks: transcribed audio track 0 of 2 (--audio-track N picks another), not 1"]


def plain_decode(path: Path, track: int) -> np.ndarray:
    """One audio stream as PyAV alone decodes it, resampled as the pipeline does."""
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        frames = [*container.decode(container.streams.audio[track]), None]
        return np.concatenate([out.to_ndarray().reshape(-1) for f in frames for out in resampler.resample(f)])


@pytest.mark.parametrize("name, track", [("silent_first", 0), ("silent_first", 1), ("three", 0), ("three", 2)])
def test_listening_to_the_other_tracks_changes_no_sample_of_the_transcribed_one(files, name, track):
    """The other tracks' packets are read beside the transcribed one's until they have been heard (for "three"
    track 2, silent, both others speak at once), then the transcribed track is read alone."""
    assert np.array_equal(decode(files[name], track)[0], plain_decode(files[name], track))


def test_a_file_with_one_audio_track_has_no_warning(files, jfk):
    audio, notes = decode(files["one"])
    assert notes == [] and aligned_correlation(audio, jfk)[0] > 0.95
    assert decode(files["one"], track=0)[1] == []


@pytest.mark.parametrize("name, track, has", [("one", 1, 1), ("silent_first", 3, 2)])
def test_a_track_the_file_lacks_is_a_decode_error(files, name, track, has):
    with pytest.raises(DecodeError, match=rf"^no audio track {track}: the file has {has} \(--audio-track counts from 0\)$"):
        list(decode_stream(files[name].read_bytes(), track=track))


def test_a_cut_multitrack_file_keeps_both_warnings(files):
    notes: list[str] = []
    with pytest.raises(TruncatedError, match=r"decoded 5\.\d s of 11\.0 s"):
        list(decode_stream(files["cut"].read_bytes(), track=None, notes=notes))
    assert notes == [EXTRA_0, SILENT_0]


def chunk_rows(files: dict[str, Path], names: list[str], audio_track: int | None) -> dict[str, dict]:
    """The CPU stage's last chunk row of each file (the one that carries its warning or error)."""
    manifest = pa.table({schema.ID: names, schema.AUDIO: [str(files[n]) for n in names],
                         schema.LANGUAGE: [None] * len(names)})
    rows = [r for b in chunk_batch(manifest, ChunkGeometry(), 80, audio_track=audio_track) for r in b.to_pylist()]
    return {r[schema.ID]: r for r in rows if r[schema.IS_LAST]}


def test_the_cpu_stage_joins_every_warning_of_a_file_in_one_column(files):
    last = chunk_rows(files, ["silent_first", "one", "cut"], None)
    assert last["silent_first"][schema.WARNING] == f"{EXTRA_0}; {SILENT_0}"
    assert last["one"][schema.WARNING] is None
    assert re.fullmatch(rf"{re.escape(EXTRA_0)}; {re.escape(SILENT_0)}; truncated: decoded 5\.\d s of 11\.0 s",
                        last["cut"][schema.WARNING])
    assert not any(r[schema.ERROR] for r in last.values())


def test_the_cpu_stage_takes_audio_track_and_a_missing_track_is_an_error_row(files):
    last = chunk_rows(files, ["silent_first", "one"], 1)
    assert last["silent_first"][schema.ERROR] is None
    assert last["one"][schema.ERROR] == "decode_error: no audio track 1: the file has 1 (--audio-track counts from 0)"


def test_audio_track_shapes_the_fingerprint_and_its_default_keeps_the_old_one():
    assert TranscribeOptions().fingerprint() == "9d415f5becd0"  # as before the option existed
    prints = {TranscribeOptions(audio_track=t).fingerprint() for t in (None, 0, 1)}
    assert len(prints) == 3


def test_through_ray_audio_track_1_transcribes_the_speech_and_a_file_without_it_is_an_error_row(
    files, tmp_path, ray_session, bundled_model
):
    import ray_whisper

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"id,audio\ntwo,{files['silent_first']}\none,{files['one']}\n")
    summary = ray_whisper.transcribe(str(manifest), str(tmp_path / "out"), audio_track=1, allow_partial=True)
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out", schema=schema.OUTPUT_SCHEMA).to_pylist()}
    two, one = rows["two"], rows["one"]
    words = re.findall(r"[a-z]+", two["text"].lower())
    assert two["status"] == "ok" and words[:4] == re.findall(r"[a-z]+", REFS["jfk.flac"]["text"].lower())[:4], two
    assert two["error"] == "extra_tracks: transcribed audio track 1 of 2 (--audio-track N picks another), not 0 (eng)"
    assert two["fingerprint"] == TranscribeOptions(audio_track=1).fingerprint()
    assert one["status"] == "error"
    assert one["error"] == "decode_error: no audio track 1: the file has 1 (--audio-track counts from 0)"
    assert summary.files_failed == 1


def test_the_endpoint_decodes_its_audio_track_and_names_the_others_in_a_header(files, bundled_model):
    """The request handler outside Serve (as test_serve's model-failure test): an upload of the two-track file
    is answered from --audio-track's track, with the batch row's warning in x-audio-warning."""
    import asyncio
    import json

    import requests
    from starlette.requests import Request

    from ray_whisper.config import ChunkOptions, DecodingOptions, ServeOptions
    from ray_whisper.serve.app import Service

    prepared = requests.Request("POST", "http://x/v1/audio/transcriptions", data={"model": "whisper-1"},
                                files={"file": ("two.mp4", files["silent_first"].read_bytes())}).prepare()

    def request() -> Request:
        return starlette_request(prepared)

    def answer(track: int | None):
        service = Service(bundled_model, "m", DecodingOptions(), ChunkOptions(audio_track=track), ServeOptions())
        return asyncio.run(service._answer(request(), "transcribe"))

    default, second = answer(None), answer(1)
    assert default.status_code == 200 and json.loads(default.body)["text"] == ""
    assert default.headers["x-audio-warning"] == f"{EXTRA_0}; {SILENT_0}"
    words = re.findall(r"[a-z]+", json.loads(second.body)["text"].lower())
    assert second.status_code == 200 and words[:4] == re.findall(r"[a-z]+", REFS["jfk.flac"]["text"].lower())[:4]
    assert second.headers["x-audio-warning"].startswith("extra_tracks: transcribed audio track 1 of 2")
