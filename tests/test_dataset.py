"""Datasets in, Datasets out: transcribe_dataset on the Ray Datasets users already have (from_items with URIs
and decoded arrays, read_binary_files, a Hugging Face dataset, read_parquet(...).filter(...)), real speech and
the real model on the session's local Ray. One output row per input row, error rows included, the other
columns carried through."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_whisper.asr import evaluation as ev

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
REFS = json.loads((DATA / "refs.json").read_text())
JFK = REFS["jfk.flac"]["text"]


def rows_by(ds, key: str) -> dict:
    return {r[key]: r for r in ds.take_all()}


def test_uris_and_decoded_arrays_with_their_columns_carried_and_a_corrupt_file_an_error_row(ray_session, tmp_path, speech_clips):
    import ray

    from ray_whisper import transcribe_dataset

    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF" + b"\0" * 100)
    jfk_audio, _ = speech_clips[0]
    at_8k = jfk_audio[::2].astype(np.float32)  # 8 kHz, as a telephone recording arrives
    uris = ray.data.from_items([{"call": "c1", "uri": str(DATA / "jfk.flac"), "agent": "ann"},
                                {"call": "c2", "uri": str(broken), "agent": "bob"}])
    out = rows_by(ray_whisper_dataset(transcribe_dataset, uris, audio_column="uri", id_column="call"), "id")
    assert set(out) == {"c1", "c2"}  # one row per input row, the corrupt one included
    assert out["c1"]["status"] == "ok" and ev.wer([JFK], [out["c1"]["text"]]) <= 0.05
    assert out["c1"]["agent"] == "ann" and out["c2"]["agent"] == "bob"  # the other columns, carried through
    assert out["c2"]["status"] == "error" and out["c2"]["error"].startswith("decode_error")
    assert out["c1"]["segments"] and out["c1"]["duration_s"] == pytest.approx(11.0, abs=0.1)

    arrays = ray.data.from_items([{"call": "c3", "agent": "cy", "samples": at_8k, "rate": 8000}])
    (row,) = ray_whisper_dataset(transcribe_dataset, arrays, audio_column="samples", id_column="call",
                                 sampling_rate_column="rate").take_all()
    assert row["id"] == "c3" and row["agent"] == "cy" and row["status"] == "ok"
    assert ev.wer([JFK], [row["text"]]) <= 0.1  # resampled from 8 kHz by the CPU stage, as any file


def test_read_binary_files_and_a_hugging_face_dataset(ray_session):
    import datasets
    import ray

    from ray_whisper import transcribe_dataset

    files = ray.data.read_binary_files([str(DATA / "jfk.flac"), str(DATA / "hotwords.mp3")], include_paths=True)
    out = rows_by(ray_whisper_dataset(transcribe_dataset, files, audio_column="bytes"), "path")
    assert {Path(p).name for p in out} == {"jfk.flac", "hotwords.mp3"}
    jfk = next(r for p, r in out.items() if p.endswith("jfk.flac"))
    assert jfk["status"] == "ok" and ev.wer([JFK], [jfk["text"]]) <= 0.05 and jfk["audio"].startswith("<")
    assert len({r["id"] for r in out.values()}) == 2

    # Hugging Face's audio feature, undecoded ({"bytes", "path"}), built offline from the real clips
    table = pa.table({"audio": pa.array([{"bytes": (DATA / "jfk.flac").read_bytes(), "path": "jfk.flac"}]),
                      "speaker": ["jfk"]})
    hf = datasets.Dataset(table).cast_column("audio", datasets.Audio(decode=False))
    (row,) = ray_whisper_dataset(transcribe_dataset, ray.data.from_huggingface(hf), audio_column="audio").take_all()
    assert row["speaker"] == "jfk" and row["audio"] == "jfk.flac" and row["status"] == "ok"
    assert ev.wer([JFK], [row["text"]]) <= 0.05


def test_composed_between_read_parquet_filter_and_write_parquet(ray_session, tmp_path):
    import ray

    from ray_whisper import transcribe_dataset

    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"call_id": ["a", "b", "c"], "day": ["mon", "tue", "mon"],
                             "uri": [str(DATA / "jfk.flac"), str(DATA / "hotwords.mp3"), str(DATA / "jfk.flac")]}), meta)
    ds = ray.data.read_parquet(str(meta)).filter(expr="day == 'mon'")
    transcribe_dataset(ds, audio_column="uri", id_column="call_id", temperatures="0").write_parquet(str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out")
    assert sorted(table["id"].to_pylist()) == ["a", "c"] and set(table["day"].to_pylist()) == {"mon"}
    assert set(table["status"].to_pylist()) == {"ok"}
    assert all(ev.wer([JFK], [t]) <= 0.05 for t in table["text"].to_pylist())


def test_a_bad_column_or_option_fails_on_the_driver(ray_session):
    import ray

    from ray_whisper import ConfigError, transcribe_dataset

    ds = ray.data.from_items([{"uri": str(DATA / "jfk.flac")}])
    with pytest.raises(ConfigError, match="no column audio_column='audio'.*its columns are: uri"):
        transcribe_dataset(ds)
    with pytest.raises(ConfigError, match="--beam-size"):
        transcribe_dataset(ds, audio_column="uri", beam_size=0)


def ray_whisper_dataset(fn, ds, **kwargs):
    """transcribe_dataset with greedy decoding only: what these tests check is the plumbing, not the fallback."""
    return fn(ds, temperatures="0", **kwargs)
