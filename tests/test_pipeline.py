"""The whole graph on local Ray with the default model and real speech: one run over a manifest that
mixes good, long, silent and broken files, checked from several sides."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_whisper.asr import evaluation as ev
from ray_whisper import schema

from audio_helpers import encode, wav_header_only
from conftest import DATA, REFS, write_wav

pytestmark = pytest.mark.slow

LONG_SECONDS = 310  # at least 5 minutes, so the file spans 11+ windows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, speech_clips):
    """Audio files and a manifest listing them (plus one path that does not exist)."""
    root = tmp_path_factory.mktemp("corpus")
    jfk, _ = speech_clips[0]
    long_audio, long_ref = ev.build_long_speech(speech_clips, LONG_SECONDS, seed=7)
    shutil.copy(DATA / "jfk.flac", root / "jfk.flac")
    write_wav(root / "long.wav", long_audio)
    write_wav(root / "silence.wav", np.zeros(16_000 * 20, dtype=np.float32))
    encode(jfk, 16_000, root / "jfk.mp3")
    mp3 = (root / "jfk.mp3").read_bytes()
    (root / "truncated.mp3").write_bytes(mp3[: len(mp3) // 2])
    (root / "empty.wav").write_bytes(b"")
    (root / "random.mp3").write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    (root / "text.flac").write_text("this is not audio\n")
    wav_header_only(root / "no_samples.wav")
    rows = ["jfk.flac", "long.wav", "silence.wav", "truncated.mp3", "empty.wav", "random.mp3", "text.flac",
            "no_samples.wav", "does_not_exist.wav", "jfk.mp3"]
    manifest = root / "manifest.csv"
    manifest.write_text("id,audio\n" + "".join(f"{Path(r).stem}-{i},{r}\n" for i, r in enumerate(rows)))
    return {"root": root, "manifest": manifest, "long_audio": long_audio, "long_ref": long_ref, "rows": rows}


@pytest.fixture(scope="module")
def run(corpus, ray_session, bundled_model):
    import ray_whisper

    out = corpus["root"] / "out"
    summary = ray_whisper.transcribe(str(corpus["manifest"]), str(out))
    table = pq.read_table(out, schema=schema.OUTPUT_SCHEMA)
    rows = {r["id"].rsplit("-", 1)[0]: r for r in table.to_pylist()}
    return summary, table, rows


def test_one_row_per_manifest_row_with_the_documented_schema(run, corpus):
    summary, table, rows = run
    assert table.num_rows == len(corpus["rows"])
    assert sorted(table["id"].to_pylist()) == sorted(f"{Path(r).stem}-{i}" for i, r in enumerate(corpus["rows"]))
    assert table.schema.equals(schema.OUTPUT_SCHEMA)
    assert summary.files_ok + summary.files_failed == len(corpus["rows"])


def test_jfk_transcript_is_accurate_with_timed_segments(run):
    row = run[2]["jfk"]
    assert row["status"] == "ok" and row["error"] is None
    assert ev.wer([REFS["jfk.flac"]["text"]], [row["text"]]) <= 0.05
    assert row["model"] == "bundled:tiny.en" and row["language"] == "en"
    assert abs(row["duration_s"] - 11.0) < 0.1 and row["num_chunks"] == 1
    segs = row["segments"]
    assert segs and segs[0]["start"] < 1.0 and segs[-1]["end"] <= row["duration_s"] + 1e-6
    assert " ".join(s["text"] for s in segs).split() == row["text"].split()


def test_mp3_of_the_same_speech_agrees(run):
    assert ev.wer([REFS["jfk.flac"]["text"]], [run[2]["jfk"]["text"]]) <= 0.05


def test_long_file_has_no_doubled_or_dropped_words_at_boundaries(run, corpus, bundled_model):
    """Chunked WER within 2 points of one sequential pass of the same model over the same audio."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    row = run[2]["long"]
    assert row["status"] == "ok"
    assert row["num_chunks"] >= 11
    chunked = ev.wer([corpus["long_ref"]], [row["text"]])

    torch.set_num_threads(2)
    model = WhisperForConditionalGeneration.from_pretrained(bundled_model).eval()
    proc = WhisperProcessor.from_pretrained(bundled_model)
    feats = proc(corpus["long_audio"], sampling_rate=16_000, return_tensors="pt", truncation=False,
                 padding="longest", return_attention_mask=True)
    with torch.inference_mode():
        ids = model.generate(feats.input_features, attention_mask=feats.attention_mask, return_timestamps=True)
    sequential = ev.wer([corpus["long_ref"]], [proc.batch_decode(ids, skip_special_tokens=True)[0]])
    print(f"\nlong file: chunked WER {chunked:.3%}, sequential WER {sequential:.3%}")
    assert chunked <= sequential + 0.02

    starts = [s["start"] for s in row["segments"]]
    ends = [s["end"] for s in row["segments"]]
    assert starts == sorted(starts) and all(a <= b for a, b in zip(starts, ends))
    assert all(e0 <= s1 for e0, s1 in zip(ends, starts[1:])), "segments overlap"
    assert ends[-1] <= row["duration_s"] + 1e-6 and row["duration_s"] >= LONG_SECONDS


def test_silence_gives_no_invented_text(run):
    row = run[2]["silence"]
    assert row["status"] == "ok" and row["text"] == "" and row["segments"] == []
    assert abs(row["duration_s"] - 20.0) < 0.1


@pytest.mark.parametrize(
    "name, kind",
    [
        ("empty", "no_audio"),
        ("random", "decode_error"),
        ("text", "decode_error"),
        ("no_samples", "no_audio"),
        ("does_not_exist", "fetch_error"),
    ],
)
def test_bad_files_become_error_rows(run, name, kind):
    row = run[2][name]
    assert row["status"] == "error" and row["text"] is None
    assert row["error"].startswith(kind + ":"), row["error"]
    assert "\n" not in row["error"]


def test_truncated_mp3_keeps_what_decodes(run):
    """Documented choice: a truncated file keeps the transcript of the part that decodes."""
    row = run[2]["truncated"]
    assert row["status"] == "ok"
    assert 3.0 < row["duration_s"] < 8.0
    assert "fellow americans" in ev.normalize(row["text"])


def test_summary_counts_and_throughput(run):
    summary = run[0]
    assert (summary.files_ok, summary.files_failed) == (5, 5)
    assert summary.errors_by_kind == {"decode_error": 2, "no_audio": 2, "fetch_error": 1}
    assert summary.audio_s > LONG_SECONDS and summary.rtfx > 0
    text = str(summary)
    assert "files ok: 5" in text and "real-time factor" in text


@pytest.fixture(scope="module")
def features_run(tmp_path_factory, ray_session, bundled_model):
    """One CLI run with the transcript features on: word timings and a prompt in the manifest, then an export."""
    from ray_whisper import cli

    root = tmp_path_factory.mktemp("features")
    manifest = root / "m.csv"
    manifest.write_text(f"id,audio,prompt\njfk,{DATA / 'jfk.flac'},\nhot,{DATA / 'hotwords.mp3'},ComfyUI\n")
    out = root / "out"
    assert cli.main(["transcribe", str(manifest), str(out), "--word-timestamps"]) == 0
    assert cli.main(["export", str(out), str(root / "subs"), "--format", "srt,json"]) == 0
    from ray_whisper.io.output import read_results

    return {r["id"]: r for r in read_results(str(out)).to_pylist()}, root / "subs"


def test_word_timings_and_prompts_reach_the_output_through_ray(features_run):
    import pysubs2

    rows, subs = features_run
    jfk, hot = rows["jfk"], rows["hot"]
    assert len(jfk["words"]) == len(jfk["text"].split()) and jfk["words"][0]["start"] < 1.0
    assert jfk["segments"][-1]["end"] == jfk["words"][-1]["end"]
    assert "ComfyUI" in hot["text"]  # the manifest's prompt conditioned that file, and only that file
    assert jfk["fingerprint"] == hot["fingerprint"]
    events = pysubs2.load(str(subs / "jfk.srt")).events
    assert events[0].start == round(jfk["words"][0]["start"] * 1000)  # cues start at their first word


@pytest.fixture(scope="module")
def multilingual_run(tmp_path_factory, ray_session, multilingual_model):
    """One run of the multilingual base through Ray, translating (detection per file is the same step for
    both tasks; transcribing in the detected language and per-chunk detection: test_stages.py)."""
    from ray_whisper import cli
    from ray_whisper.io.output import read_results

    root = tmp_path_factory.mktemp("multilingual")
    manifest = root / "m.csv"
    manifest.write_text(f"id,audio\nmit,{DATA / 'multilingual.mp3'}\n")
    out = root / "translate"
    assert cli.main(["transcribe", str(manifest), str(out), "--model", multilingual_model, "--task", "translate"]) == 0
    return read_results(str(out)).to_pylist()[0]


def test_a_multilingual_file_through_ray_detected_once_and_translated(multilingual_run):
    translated = multilingual_run  # English, then German: one language for the file, the German half translated
    assert translated["language"] == "en" and {s["language"] for s in translated["segments"]} == {"en"}
    assert translated["language_probability"] > 0.9
    english = ev.normalize(translated["text"]).split()
    assert "software" in english and not {"der", "und", "die"} & set(english)
