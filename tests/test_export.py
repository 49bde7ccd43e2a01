"""Subtitle and text files from a run's table: cue conventions (pure), then `ray-whisper export` over real
transcripts, read back by parsers that are not the ones that wrote them (pysubs2 for SRT and WebVTT)."""

from __future__ import annotations

import html
import json

import numpy as np
import pyarrow as pa
import pysubs2
import pytest

from ray_whisper import cli, schema
from ray_whisper.asr import evaluation as ev
from ray_whisper.io.output import OutputDir
from ray_whisper.io.subtitles import MAX_CHARS, MAX_LINES, cues

from conftest import DATA, write_wav

WORDS = ("the quick brown fox jumps over the lazy dog while seventeen extraordinarily talkative "
         "parrots recite the licence").split()


def check_conventions(cue_list, duration):
    assert all(1 <= len(c.lines) <= MAX_LINES for c in cue_list)
    assert all(len(line) <= MAX_CHARS or " " not in line for c in cue_list for line in c.lines)
    starts = [c.start for c in cue_list]
    assert starts == sorted(starts)
    assert all(0 <= c.start <= c.end <= duration for c in cue_list)
    assert all(a.end <= b.start for a, b in zip(cue_list, cue_list[1:]))


@pytest.mark.parametrize("n", [1, 7, 16, 40, 120])
def test_a_segment_becomes_cues_of_two_lines_of_42_characters_cut_at_words(n):
    text = " ".join((WORDS * 10)[:n])
    out = cues([{"start": 1.0, "end": 1.0 + n * 0.4, "text": text}], duration=100.0)
    check_conventions(out, 100.0)
    assert " ".join(" ".join(c.lines) for c in out) == text
    assert out[0].start == 1.0 and out[-1].end == pytest.approx(1.0 + n * 0.4, abs=0.01)


def test_word_timings_decide_where_cues_start_and_end():
    words = [{"word": f" {w}", "start": 2.0 + i * 0.5, "end": 2.3 + i * 0.5, "probability": 0.9}
             for i, w in enumerate(WORDS)]
    out = cues([{"start": 2.0, "end": words[-1]["end"], "text": " ".join(WORDS)}], words, duration=30.0)
    check_conventions(out, 30.0)
    assert len(out) > 1
    starts = {w["start"] for w in words}
    ends = {w["end"] for w in words}
    assert all(c.start in starts and c.end in ends for c in out)  # each cue from its first word to its last
    assert " ".join(" ".join(c.lines) for c in out) == " ".join(WORDS)


def test_a_word_longer_than_a_line_gets_a_line_of_its_own():
    long = "x" * 60
    out = cues([{"start": 0.0, "end": 3.0, "text": f"a {long} b"}], duration=3.0)
    assert [line for c in out for line in c.lines] == ["a", long, "b"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, speech_clips, bundled_model):
    """A committed OUTPUT_DIR holding real transcripts: a 2-minute file, jfk (under ids with folders), and an
    error row; made with the pipeline's own stages, without Ray."""
    from ray_whisper.batch.assemble import Assembler
    from ray_whisper.asr.chunking import ChunkGeometry
    from ray_whisper.config import DecodingOptions
    from ray_whisper.batch.cpu_stage import chunk_batch
    from ray_whisper.batch.model_stage import ModelStage

    root = tmp_path_factory.mktemp("export")
    long_audio, _ = ev.build_long_speech(speech_clips, 120, seed=5)
    paths = {"talks/long": write_wav(root / "long.wav", long_audio), "talks/2024/jfk": DATA / "jfk.flac",
             "broken": root / "missing.wav"}
    manifest = pa.table({"id": list(paths), "audio": [str(p) for p in paths.values()], "language": [None] * 3})
    tr = ModelStage(bundled_model, DecodingOptions(), cpu_threads=2)
    chunks = pa.concat_tables(list(chunk_batch(manifest, ChunkGeometry(), 80)))
    rows = Assembler(tr.engine.checkpoint, "m", "fp")(tr({n: chunks[n].to_numpy(zero_copy_only=False) for n in chunks.column_names}))
    out = OutputDir.open(str(root / "out"))
    todo, done = out.begin(manifest, "fp", overwrite=False, retry_errors=False)
    part = out.writer("r1").write(rows.to_pylist())
    receipts = pa.table({"id": rows["id"], "status": rows["status"], "duration_s": rows["duration_s"],
                         "error": rows["error"], "part": [part] * rows.num_rows,
                         "write_error": pa.nulls(rows.num_rows, pa.string())}, schema=schema.RECEIPT_SCHEMA)
    out.commit("r1", out.complete(manifest, done, receipts, "r1", "m", "fp"), {})
    return root / "out", {r["id"]: r for r in rows.to_pylist()}


def test_export_writes_each_format_for_each_ok_row_and_parsers_read_them_back(finished_run, tmp_path, capsys):
    out, rows = finished_run
    dest = tmp_path / "subs"
    assert cli.main(["export", str(out), str(dest), "--format", "srt,vtt,txt,json"]) == 0
    assert "exported 8 file(s) for 2 row(s)" in capsys.readouterr().out
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "talks/2024/jfk.json", "talks/2024/jfk.srt", "talks/2024/jfk.txt", "talks/2024/jfk.vtt",
        "talks/long.json", "talks/long.srt", "talks/long.txt", "talks/long.vtt",
    ]  # ids with "/" became folders; the error row has no transcript
    for file_id, row in rows.items():
        if row["status"] != "ok":
            continue
        for fmt in ("srt", "vtt"):
            text = (dest / f"{file_id}.{fmt}").read_text()
            events = pysubs2.SSAFile.from_string(text, format_=fmt).events
            assert events, fmt
            starts = [e.start for e in events]
            assert starts == sorted(starts) and all(e.start <= e.end <= row["duration_s"] * 1000 + 1 for e in events)
            lines = [line for e in events for line in e.plaintext.split("\n")]
            assert all(len(line) <= MAX_CHARS for line in lines) and all(len(e.plaintext.split("\n")) <= 2 for e in events)
            joined = " ".join(html.unescape(e.plaintext).replace("\n", " ") for e in events)
            assert ev.normalize(joined) == ev.normalize(row["text"])
        assert (dest / f"{file_id}.txt").read_text().strip() == row["text"]
        assert json.loads((dest / f"{file_id}.json").read_text())["segments"] == row["segments"]
    assert len(pysubs2.load(str(dest / "talks/long.srt")).events) > 10


def test_export_refuses_an_unfinished_run_unless_asked(finished_run, tmp_path, capsys):
    import shutil

    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "_SUCCESS").unlink()
    assert cli.main(["export", str(copy), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "did not finish" in err and "--partial" in err
    assert cli.main(["export", str(copy), str(tmp_path / "b"), "--partial", "--format", "txt"]) == 0
    assert sorted(p.name for p in (tmp_path / "b").rglob("*.txt")) == ["jfk.txt", "long.txt"]
    assert cli.main(["export", str(out), str(tmp_path / "c"), "--format", "docx"]) == 2
    assert "--format 'docx': choose from srt, vtt, txt, json" in capsys.readouterr().err


def test_an_id_that_would_leave_the_folder_is_skipped(tmp_path, caplog):
    from ray_whisper.io.export import export

    out = OutputDir.open(str(tmp_path / "out"))
    ids = ["../escape", "/abs", "fine"]
    manifest = pa.table({"id": ids, "audio": ["/x.wav"] * 3, "language": [None] * 3})
    todo, done = out.begin(manifest, "fp", overwrite=False, retry_errors=False)
    row = {"audio": "/x.wav", "text": "hi", "segments": [{"start": 0.0, "end": 1.0, "text": "hi"}], "language": "en",
           "duration_s": 1.0, "num_chunks": 1, "model": "m", "fingerprint": "fp", "status": "ok", "error": None}
    part = out.writer("r").write([{"id": i, **row} for i in ids])
    receipts = pa.table({"id": ids, "status": ["ok"] * 3, "duration_s": [1.0] * 3, "error": [None] * 3,
                         "part": [part] * 3, "write_error": [None] * 3}, schema=schema.RECEIPT_SCHEMA)
    out.commit("r", out.complete(manifest, done, receipts, "r", "m", "fp"), {})
    result = export(str(tmp_path / "out"), str(tmp_path / "dest"))
    assert result.rows == 1 and sorted(p.name for p in (tmp_path / "dest").iterdir()) == [f"fine.{f}" for f in ("json", "srt", "txt", "vtt")]
    assert "'../escape'" in caplog.text and not (tmp_path / "escape.srt").exists()
    assert np.all([not p.exists() for p in (tmp_path.parent / "escape.srt", tmp_path / "abs.srt")])
