"""The driver's memory per manifest row: what it holds for a long manifest stays well under 1 KB a row (it was
~11 KB, so a million-row manifest needed ~13 GB on the head node). benchmarks/scale.py measures whole runs."""

from __future__ import annotations

import gc
import os
import tracemalloc

import psutil
import pyarrow as pa

from ray_whisper import schema
from ray_whisper.batch import pipeline
from ray_whisper.io.output import OutputDir

ROWS = 100_000
BOUND = 1024  # bytes of driver memory per manifest row


def _manifest(n: int) -> pa.Table:
    return pa.table({
        schema.ID: pa.array([f"s{i:07d}" for i in range(n)], pa.string()),
        schema.AUDIO: pa.array([f"/data/calls/{i // 10_000:04d}/s{i:07d}.wav" for i in range(n)], pa.string()),
        schema.LANGUAGE: pa.nulls(n, pa.string()),
        schema.PROMPT: pa.nulls(n, pa.string()),
    })


def test_manifest_dataset_costs_the_driver_little_per_row(ray_session):
    """Building the Dataset of a 100k-row manifest (what _assembled does before the stages): the driver's RSS and
    its Python objects grow by less than BOUND per row. One block put per decode task took ~45 KB each."""
    table = _manifest(ROWS)
    gc.collect()
    before = psutil.Process().memory_info().rss
    tracemalloc.start()
    try:
        ds = pipeline.manifest_rows(table, files_per_task=4)
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grown = psutil.Process().memory_info().rss - before
    assert traced / ROWS < BOUND / 4, f"{traced / ROWS:.0f} B of Python objects per row"
    assert grown / ROWS < BOUND, f"driver RSS grew {grown / ROWS:.0f} B per row"
    del ds


def test_manifest_dataset_gives_each_decode_task_files_per_task_rows(ray_session, monkeypatch):
    """The large blocks put from the driver reach the decode stage cut into blocks of files_per_task rows (one
    task each, so a file that kills its worker costs only its own block), every row once."""
    monkeypatch.setattr(pipeline, "SOURCE_BLOCK_TASKS", 4)  # blocks of 12 rows: the cut crosses them
    ds = pipeline.manifest_rows(_manifest(31), files_per_task=3)
    seen = ds.map_batches(lambda b: pa.table({"n": [b.num_rows], "ids": [",".join(b[schema.ID].to_pylist())]}),
                          batch_size=None, batch_format="pyarrow").take_all()
    assert sorted(r["n"] for r in seen) == [1] + [3] * 10
    ids = sorted(i for r in seen for i in r["ids"].split(","))
    assert ids == [f"s{i:07d}" for i in range(31)]


def test_a_row_that_kills_its_decode_worker_costs_only_its_own_block(ray_session, monkeypatch):
    """With the run's context (pipeline.run_context, as pipeline.stages sets it), a task that dies every time
    loses its block of files_per_task rows, which OutputDir.complete turns into `lost` rows; the other blocks
    come through. The context is the dataset's own: the process's current one is left as it was (setting that
    one after the dataset was made, as stages used to, never reached the run: the first lost block was fatal)."""
    import ray.data

    monkeypatch.setattr(pipeline, "SOURCE_BLOCK_TASKS", 4)

    def decode(block: pa.Table) -> pa.Table:
        if "s0000013" in block[schema.ID].to_pylist():
            os._exit(1)  # as a file that crashes the decoder would
        return block.select([schema.ID])

    current = ray.data.DataContext.get_current().max_errored_blocks
    ds = pipeline.manifest_rows(_manifest(31), files_per_task=3)
    pipeline.run_context(ds)
    assert ray.data.DataContext.get_current().max_errored_blocks == current == 0
    ids = {r[schema.ID] for r in ds.map_batches(decode, batch_size=None, batch_format="pyarrow", max_retries=1).take_all()}
    assert {f"s{i:07d}" for i in range(31)} - ids == {"s0000012", "s0000013", "s0000014"}


def test_begin_and_complete_cost_the_driver_little_per_row(tmp_path):
    """OutputDir.begin and .complete over a 100k-row manifest, every row received: the Python objects they
    allocate at their peak stay under BOUND / 4 per row (the rest of the budget is the stages')."""
    table = _manifest(ROWS)
    out = OutputDir.open(str(tmp_path / "out"))
    receipts = pa.table({
        schema.ID: table[schema.ID], schema.STATUS: pa.array([schema.STATUS_OK] * ROWS, pa.string()),
        schema.DURATION_S: pa.array([0.5] * ROWS, pa.float64()), schema.ERROR: pa.nulls(ROWS, pa.string()),
        schema.PART: pa.array([f"part-{i // 512}.parquet" for i in range(ROWS)], pa.string()),
        schema.WRITE_ERROR: pa.nulls(ROWS, pa.string()),
    }, schema=schema.RECEIPT_SCHEMA)
    gc.collect()
    tracemalloc.start()
    try:
        todo, done = out.begin(table, "fp", overwrite=False, retry_errors=False)
        rows = out.complete(table, done, receipts, "run", "tiny.en", "fp")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert todo.num_rows == ROWS and rows.num_rows == ROWS
    assert peak / ROWS < BOUND / 4, f"{peak / ROWS:.0f} B of Python objects per row at the peak"

