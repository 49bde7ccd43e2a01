"""Every engine reads a committed OUTPUT_DIR right: exactly one row per manifest row, the current one, after any
sequence of runs (a first run, a resume, --retry-errors, --overwrite, a run killed before it commits and its
rerun). The readers: pandas and pyarrow over the directory, DuckDB over `*.parquet` and `**/*.parquet`, Polars
over `*.parquet`, Ray Data over the directory.

First the output's own begin/complete/commit over sequences of runs drawn by Hypothesis, and on S3 (moto);
then real runs of the pipeline on the session's Ray (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_whisper import schema
from ray_whisper.batch.report import summarize
from ray_whisper.io.output import META, SUCCESS, OutputDir, read_results
from ray_whisper.io.parts import SCHEMA_VERSION

from conftest import DATA, write_wav

IDS = ["a", "b", "c", "d"]
MANIFEST = pa.table({"id": IDS, "audio": [f"/a/{i}.wav" for i in IDS], "language": [None] * len(IDS)})
COLUMNS = ["id", "status", "fingerprint"]


def every_reader(out: str, ray: bool = False) -> dict[str, list[tuple]]:
    """(id, status, fingerprint) of every row, sorted, as each engine reads the directory."""
    frames = {
        "pandas": pd.read_parquet(out, columns=COLUMNS),
        "pyarrow.dataset": pads.dataset(out).to_table(columns=COLUMNS).to_pandas(),
        "duckdb *.parquet": duckdb.sql(f"SELECT id, status, fingerprint FROM read_parquet('{out}/*.parquet')").df(),
        "duckdb **/*.parquet": duckdb.sql(f"SELECT id, status, fingerprint FROM read_parquet('{out}/**/*.parquet')").df(),
        "polars *.parquet": pl.scan_parquet(f"{out}/*.parquet").select(COLUMNS).collect().to_pandas(),
    }
    if ray:
        import ray.data

        frames["ray.data"] = ray.data.read_parquet(out).select_columns(COLUMNS).to_pandas()
    return {k: sorted(f[COLUMNS].itertuples(index=False, name=None)) for k, f in frames.items()}


def assert_read_right(out: str, expected: list[tuple], ray: bool = False) -> None:
    assert sorted(read_results(out).select(COLUMNS).to_pandas().itertuples(index=False, name=None)) == expected
    for reader, rows in every_reader(out, ray).items():
        assert rows == expected, reader


def output_row(i: str, status: str, fingerprint: str) -> dict:
    return {"id": i, "audio": f"/a/{i}.wav", "text": "hi" if status == "ok" else None, "segments": [],
            "language": "en", "duration_s": 1.0, "num_chunks": 1, "model": "m", "fingerprint": fingerprint,
            "status": status, "error": None if status == "ok" else "decode_error: bad"}


def a_run(uri: str, run: str, outcome: dict[str, str], fingerprint: str = "fp", *, overwrite: bool = False,
          retry_errors: bool = False, parts: int = 1, killed_after: int | None = None, storage=None) -> list[str]:
    """One run as the pipeline makes it: the assemble stage writes the todo rows' `outcome` (ok, error, or
    lost: no row comes back) in `parts` parts; killed after `killed_after` rows, it never commits. Returns
    the ids it had to do."""
    out = OutputDir.open(uri, storage)
    todo, done = out.begin(MANIFEST, fingerprint, overwrite=overwrite, retry_errors=retry_errors)
    rows = [output_row(i, outcome[i], fingerprint) for i in todo["id"].to_pylist() if outcome[i] != "lost"]
    rows = rows if killed_after is None else rows[:killed_after]
    receipts = []
    for k in range(parts):
        batch = rows[k::parts]
        if batch:
            part = out.writer(run).write(batch)
            receipts += [{**{c: r[c] for c in ("id", "status", "duration_s", "error")}, "part": part} for r in batch]
    if killed_after is None:
        receipts = pa.Table.from_pylist(receipts, schema=schema.RECEIPT_SCHEMA)
        rows_now = out.complete(MANIFEST, done, receipts, run, "m", fingerprint)
        out.commit(run, rows_now, summarize(rows_now, receipts, 1.0, uri, done.num_rows).as_dict())
    return todo["id"].to_pylist()


step = st.fixed_dictionaries({
    "overwrite": st.booleans(),
    "retry_errors": st.booleans(),
    "fingerprint": st.sampled_from(["fp1", "fp2"]),
    "outcome": st.fixed_dictionaries({i: st.sampled_from(["ok", "ok", "error", "lost"]) for i in IDS}),
    "parts": st.integers(1, 3),
    "killed_after": st.none() | st.integers(0, 3),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=5))
def test_after_any_sequence_of_runs_every_engine_reads_one_current_row_per_id(tmp_path_factory, steps):
    uri = str(tmp_path_factory.mktemp("out"))
    steps = steps + [{**steps[-1], "killed_after": None, "outcome": dict.fromkeys(IDS, "ok")}]  # the rerun
    model: dict[str, tuple[str, str, bool]] = {}  # id -> (status, fingerprint, lost): the row that must win
    for n, s in enumerate(steps):
        redo = [i for i in IDS if s["overwrite"] or i not in model or model[i][2]
                or (s["retry_errors"] and model[i][0] == "error")]
        todo = a_run(uri, f"r{n:02d}", s["outcome"], s["fingerprint"], overwrite=s["overwrite"],
                     retry_errors=s["retry_errors"], parts=s["parts"], killed_after=s["killed_after"])
        assert todo == redo
        written = [i for i in todo if s["outcome"][i] != "lost"]
        for i in written if s["killed_after"] is None else written[: s["killed_after"]]:
            model[i] = (s["outcome"][i], s["fingerprint"], False)
        if s["killed_after"] is not None:
            continue
        for i in todo:
            if s["outcome"][i] == "lost":
                model[i] = ("error", s["fingerprint"], True)
        assert_read_right(uri, sorted((i, status, fp) for i, (status, fp, _) in model.items()))
        names = {p.name for p in Path(uri).iterdir()}
        assert names - {SUCCESS, META} == {n for n in names if n.startswith("part-") and n.endswith(".parquet")}
        assert [p.name for p in (Path(uri) / META).iterdir()] == [f"index-r{n:02d}.arrow"]  # the committing run's


def test_a_commit_rewrites_only_the_parts_that_hold_superseded_rows(tmp_path):
    uri = str(tmp_path / "out")
    a_run(uri, "r1", {"a": "ok", "b": "error", "c": "ok", "d": "ok"}, parts=2)  # [a, c] and [b, d]
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.glob("out/part-*")}
    held = {n: pq.read_table(tmp_path / "out" / n)["id"].to_pylist() for n in first}
    assert a_run(uri, "r2", dict.fromkeys(IDS, "ok"), retry_errors=True) == ["b"]
    now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.glob("out/part-*")}
    ac = next(n for n, ids in held.items() if ids == ["a", "c"])
    assert now[ac] == first[ac]  # untouched: not rewritten, not even renamed
    bd = next(n for n, ids in held.items() if ids == ["b", "d"])
    assert bd not in now  # held b's old error row: rewritten beside with d only (same run, so it sorts alike)
    rewritten = [n for n in now if n not in first and n.startswith("part-r1-")]
    assert len(rewritten) == 1 and pq.read_table(tmp_path / "out" / rewritten[0])["id"].to_pylist() == ["d"]
    assert_read_right(uri, [(i, "ok", "fp") for i in IDS])


def test_an_overwrite_removes_the_old_rows_only_when_it_commits(tmp_path):
    uri = str(tmp_path / "out")
    a_run(uri, "r1", dict.fromkeys(IDS, "ok"))
    a_run(uri, "r2", dict.fromkeys(IDS, "ok"), "new", overwrite=True, killed_after=2)
    rows = every_reader(uri)["duckdb *.parquet"]  # uncommitted: both, and no _SUCCESS to say complete
    assert {(i, "ok", "fp") for i in IDS} <= set(rows) and len(rows) == 6
    assert not (tmp_path / "out" / SUCCESS).exists()
    a_run(uri, "r3", dict.fromkeys(IDS, "ok"), "new", overwrite=True)  # its rerun
    assert_read_right(uri, [(i, "ok", "new") for i in IDS])
    assert {p.name.split("-")[1] for p in tmp_path.glob("out/part-*")} == {"r3"}  # the killed run's parts too


def test_a_directory_committed_in_the_earlier_layout_is_read_and_resumed(tmp_path):
    """The index beside the parts, as Parquet (`_index-<run>.parquet`), as ray_whisper wrote it before."""
    uri, root = str(tmp_path / "out"), tmp_path / "out"
    OutputDir.open(uri).check_writable()
    part = OutputDir.open(uri).writer("r1").write([output_row(i, "error" if i == "b" else "ok", "fp") for i in IDS])
    pq.write_table(pa.table({"id": IDS, "part": [part] * len(IDS)}), root / "_index-r1.parquet")
    marker = {"tool": "ray_whisper", "schema_version": SCHEMA_VERSION, "run_id": "r1", "index": "_index-r1.parquet",
              "rows": len(IDS), "summary": {}}
    (root / SUCCESS).write_text(json.dumps(marker))
    assert sorted(read_results(uri)["status"].to_pylist()) == ["error", "ok", "ok", "ok"]
    assert a_run(uri, "r2", dict.fromkeys(IDS, "ok"), retry_errors=True) == ["b"]
    assert not (root / "_index-r1.parquet").exists()
    assert_read_right(uri, [(i, "ok", "fp") for i in IDS])


# ---------------------------------------------------------------- real runs of the pipeline (slow)


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory, ray_session, bundled_model):
    """One sequence of real runs over three files (speech, a file that is not audio until it is fixed, and
    silence), and what every engine read after each of them."""
    import ray_whisper
    from ray_whisper.config import TranscribeOptions

    root = tmp_path_factory.mktemp("readers")
    shutil.copy(DATA / "jfk.flac", root / "a.flac")
    (root / "b.flac").write_text("not audio yet\n")
    write_wav(root / "c.wav", np.zeros(16_000 * 2, dtype=np.float32))
    manifest = root / "m.csv"
    manifest.write_text("id,audio\n" + "".join(f"{i},{root / n}\n" for i, n in zip("abc", ("a.flac", "b.flac", "c.wav"))))
    out, m = str(root / "out"), str(manifest)
    seen = {}

    def parts() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (root / "out").glob("part-*")}

    ray_whisper.transcribe(m, out)
    seen["first run"] = every_reader(out, ray=True)
    shutil.copy(DATA / "jfk.flac", root / "b.flac")
    ray_whisper.transcribe(m, out, retry_errors=True)
    seen["--retry-errors"] = every_reader(out, ray=True)
    before = parts()
    ray_whisper.transcribe(m, out)
    seen["resume"] = every_reader(out, ray=True)
    seen["resume rewrote no part"] = parts() == before
    with mock.patch.object(OutputDir, "commit", side_effect=RuntimeError("killed before it commits")):
        with pytest.raises(RuntimeError):
            ray_whisper.transcribe(m, out, overwrite=True, word_timestamps=True)
    seen["--overwrite killed"] = every_reader(out)
    ray_whisper.transcribe(m, out, overwrite=True, word_timestamps=True)
    seen["--overwrite rerun"] = every_reader(out, ray=True)
    return seen, TranscribeOptions().fingerprint(), TranscribeOptions(word_timestamps=True).fingerprint()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["first run", "--retry-errors", "resume", "--overwrite rerun"])
def test_real_runs_read_right_with_every_engine(pipeline_runs, stage):
    seen, fp, fp_words = pipeline_runs
    fingerprint = fp_words if stage == "--overwrite rerun" else fp
    b = "error" if stage == "first run" else "ok"
    expected = [("a", "ok", fingerprint), ("b", b, fingerprint), ("c", "ok", fingerprint)]
    for reader, rows in seen[stage].items():
        assert rows == expected, (stage, reader)
    assert set(seen[stage]) >= {"pandas", "duckdb **/*.parquet", "polars *.parquet", "ray.data"}


@pytest.mark.slow
def test_a_resume_rewrites_nothing_and_an_overwrite_that_never_commits_keeps_the_old_rows(pipeline_runs):
    seen, fp, _ = pipeline_runs
    assert seen["resume rewrote no part"]
    for reader, rows in seen["--overwrite killed"].items():  # uncommitted: the new rows beside the old ones
        assert {("a", "ok", fp), ("b", "ok", fp), ("c", "ok", fp)} <= set(rows), reader


# ---------------------------------------------------------------- on S3


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory):
    """A moto S3 server of this module's own (tests/test_s3.py's helpers), with an empty bucket."""
    from test_s3 import boto, moto_server

    with moto_server(tmp_path_factory.mktemp("s3") / "moto.log") as url:
        boto(url).create_bucket(Bucket="readers")
        yield url


def test_on_s3_a_commit_compacts_with_puts_and_deletes_and_engines_read_it_right(s3_url):
    from test_s3 import arrow_s3, boto

    from ray_whisper.config import StorageOptions

    opts, uri = StorageOptions(s3_endpoint_url=s3_url), "s3://readers/out"
    a_run(uri, "r1", {"a": "ok", "b": "error", "c": "ok", "d": "lost"}, parts=2, storage=opts)
    a_run(uri, "r2", dict.fromkeys(IDS, "ok"), retry_errors=True, storage=opts)
    expected = sorted((i, "ok", "fp") for i in IDS)
    assert sorted(read_results(uri, opts).select(COLUMNS).to_pandas().itertuples(index=False, name=None)) == expected
    keys = sorted(k["Key"] for k in boto(s3_url).list_objects_v2(Bucket="readers", Prefix="out/")["Contents"])
    assert [k for k in keys if not k.startswith("out/part-")] == ["out/_SUCCESS", f"out/{META}/index-r2.arrow"], keys
    frames = {
        "pandas": pd.read_parquet(uri, columns=COLUMNS, storage_options={"client_kwargs": {"endpoint_url": s3_url}}),
        "pyarrow.dataset": pads.dataset("readers/out", filesystem=arrow_s3(s3_url)).to_table(columns=COLUMNS).to_pandas(),
    }
    for reader, frame in frames.items():
        assert sorted(frame.itertuples(index=False, name=None)) == expected, reader
