"""OUTPUT_DIR is ours: parts are marked and checked, foreign files are never trusted or deleted, the summary
counts this manifest's rows only, rows made with other options are pointed out, and URIs are stored without
their secrets. Pure: no Ray, no model."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_whisper import schema
from ray_whisper.config import TranscribeOptions
from ray_whisper.io.manifest import read_manifest
from ray_whisper.io.output import OutputDir, read_results
from ray_whisper.batch.report import summarize
from ray_whisper.io.storage import public_uri


def manifest(*ids: str) -> pa.Table:
    return pa.table({"id": list(ids), "audio": [f"/a/{i}.wav" for i in ids], "language": [None] * len(ids)})


def row(i: str, status: str = "ok", fingerprint: str = "fp", text: str = "hi") -> dict:
    return {"id": i, "audio": f"/a/{i}.wav", "text": text if status == "ok" else None, "segments": [],
            "language": "en", "duration_s": 2.0, "num_chunks": 1, "model": "m", "fingerprint": fingerprint,
            "status": status, "error": None if status == "ok" else "decode_error: bad"}


def finish(out: OutputDir, table: pa.Table, rows: list[dict], run: str = "r1", fingerprint: str = "fp",
           retry_errors: bool = False, overwrite: bool = False):
    """A whole run as the pipeline does it, with `rows` as what its assemble stage wrote."""
    todo, done = out.begin(table, fingerprint, overwrite=overwrite, retry_errors=retry_errors)
    wrote = [r for r in rows if r["id"] in set(todo["id"].to_pylist())]
    receipts = schema.RECEIPT_SCHEMA.empty_table()
    if wrote:
        part = out.writer(run).write(wrote)
        receipts = pa.Table.from_pylist([{"id": r["id"], "status": r["status"], "duration_s": r["duration_s"],
                                          "error": r["error"], "part": part} for r in wrote], schema=schema.RECEIPT_SCHEMA)
    rows_now = out.complete(table, done, receipts, run, "m", fingerprint)
    summary = summarize(rows_now, receipts, 1.0, out.uri, done.num_rows)
    out.commit(run, rows_now, summary.as_dict())
    return summary


def test_a_foreign_part_with_our_columns_is_neither_trusted_nor_deleted(tmp_path):
    out = OutputDir.open(str(tmp_path / "out"))
    out.check_writable()
    foreign = tmp_path / "out" / "part-someone.parquet"
    pq.write_table(pa.Table.from_pylist([row("a", text="NOT OURS")], schema=schema.OUTPUT_SCHEMA), foreign)  # no mark
    todo, done = out.begin(manifest("a"), "fp", overwrite=False, retry_errors=False)
    assert todo["id"].to_pylist() == ["a"] and done.num_rows == 0  # not taken as done
    finish(out, manifest("a"), [row("a", text="ours")])
    assert read_results(str(tmp_path / "out"))["text"].to_pylist() == ["ours"]
    assert foreign.exists()
    finish(OutputDir.open(str(tmp_path / "out")), manifest("a"), [], run="r2")  # a resume: still never deleted
    assert foreign.exists()


@pytest.mark.parametrize("content", [
    pa.table({"id": ["a"], "status": ["ok"], "other": [1]}),  # another schema
    pa.table({"id": [{"x": 1}], "status": ["ok"]}),  # a nested id type
    b"not parquet at all",
])
def test_anything_else_named_like_a_part_is_ignored_without_harm(tmp_path, content, caplog):
    out = OutputDir.open(str(tmp_path / "out"))
    out.check_writable()
    path = tmp_path / "out" / "part-x.parquet"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        pq.write_table(content, path)
    with caplog.at_level(logging.WARNING):
        summary = finish(out, manifest("a", "b"), [row("a"), row("b")])
    assert (summary.files_ok, summary.files_failed) == (2, 0)  # no null rows counted as failures
    assert path.exists() and "part-x.parquet" in caplog.text and "not ours" in caplog.text
    assert sorted(read_results(str(tmp_path / "out"))["id"].to_pylist()) == ["a", "b"]


def test_the_summary_counts_only_this_manifests_rows(tmp_path):
    out = OutputDir.open(str(tmp_path / "out"))
    earlier = [row(f"old{i}") for i in range(14)] + [row(f"bad{i}", "error") for i in range(2)]
    finish(out, manifest(*[r["id"] for r in earlier]), earlier)
    summary = finish(out, manifest("new"), [row("new")], run="r2")
    assert (summary.files_ok, summary.files_failed, summary.skipped) == (1, 0, 0)
    assert read_results(str(tmp_path / "out"))["id"].to_pylist() == ["new"]


def test_a_rerun_with_other_options_keeps_the_rows_and_says_how_to_redo_them(tmp_path, caplog):
    out = OutputDir.open(str(tmp_path / "out"))
    finish(out, manifest("a"), [row("a", fingerprint=TranscribeOptions().fingerprint())])
    other = TranscribeOptions(beam_size=5).fingerprint()
    assert other != TranscribeOptions().fingerprint() == TranscribeOptions(batch_size=4).fingerprint()
    with caplog.at_level(logging.WARNING):
        todo, done = out.begin(manifest("a"), other, overwrite=False, retry_errors=False)
    assert todo.num_rows == 0 and "made with other options" in caplog.text and "--overwrite" in caplog.text
    todo, _ = out.begin(manifest("a"), other, overwrite=True, retry_errors=False)
    assert todo["id"].to_pylist() == ["a"]


def test_overwrite_removes_our_parts_only_and_only_when_the_new_run_commits(tmp_path):
    out = OutputDir.open(str(tmp_path / "out"))
    finish(out, manifest("a"), [row("a")])
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "part-foreign.parquet").write_bytes(b"x")
    old = sorted(p.name for p in (tmp_path / "out").glob("part-r1-*"))
    todo, _ = out.begin(manifest("a"), "fp", overwrite=True, retry_errors=False)
    assert todo["id"].to_pylist() == ["a"] and old == sorted(p.name for p in (tmp_path / "out").glob("part-r1-*"))
    finish(OutputDir.open(str(tmp_path / "out")), manifest("a"), [row("a", text="new")], run="r2", overwrite=True)
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("part-r2-"))
    assert names == ["_SUCCESS", "_ray_whisper", "notes.txt", "part-foreign.parquet"]
    assert read_results(str(tmp_path / "out"))["text"].to_pylist() == ["new"]


def test_retry_errors_adds_rows_and_the_latest_wins(tmp_path):
    out = OutputDir.open(str(tmp_path / "out"))
    finish(out, manifest("a", "b"), [row("a"), row("b", "error")])
    todo, _ = out.begin(manifest("a", "b"), "fp", overwrite=False, retry_errors=True)
    assert todo["id"].to_pylist() == ["b"]
    finish(OutputDir.open(str(tmp_path / "out")), manifest("a", "b"), [row("b")], run="r2", retry_errors=True)
    table = read_results(str(tmp_path / "out"))
    assert sorted(zip(table["id"].to_pylist(), table["status"].to_pylist())) == [("a", "ok"), ("b", "ok")]


def test_an_output_dir_that_is_a_file_says_so(tmp_path):
    from ray_whisper.errors import OutputError

    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory") as ei:
        OutputDir.open(str(tmp_path / "out")).check_writable()
    assert "bucket" not in str(ei.value)


SIGNED = ("https://user:hunter2@store.example/a/b.wav?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F{day}"
          "&X-Amz-Date={day}T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={sig}")


def test_uris_are_stored_without_their_secrets_and_a_resigned_url_keeps_its_id(tmp_path):
    first, second = SIGNED.format(day="20261201", sig="a1" * 32), SIGNED.format(day="20261202", sig="b2" * 32)
    shown = public_uri(first)
    assert "hunter2" not in shown and "a1a1" not in shown and "AKIAX" not in shown
    assert shown.startswith("https://user:***@store.example/a/b.wav?") and "X-Amz-Signature=***" in shown
    assert public_uri(second) == shown
    (tmp_path / "m.csv").write_text(f"audio\n{first}\n")
    (tmp_path / "n.csv").write_text(f"audio\n{second}\n")
    assert read_manifest(str(tmp_path / "m.csv"))["id"] == read_manifest(str(tmp_path / "n.csv"))["id"]
    assert public_uri("/local/a.wav") == "/local/a.wav" and public_uri("s3://b/k.wav?versionId=3") == "s3://b/k.wav?versionId=3"
