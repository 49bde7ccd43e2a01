"""A worker node lost mid-run, as a preempted spot node is, costs no row and no rerun once capacity returns.

Each case is its own process with its own 3-node Ray (tests/node_loss_run.py, the harness of
tests/placement_run.py): a head that takes no work, a decode node and a model node. After the run's second
part is written, the decode node and, after the next part, the model node are removed without warning, or
both at once (every node but the head, wherever a worker-side stage could keep state); nodes with the same
resources join once the GCS has marked them dead. The run must still end with exit 0, one `ok` row per
manifest row, the right transcripts and `_SUCCESS`, in that one run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import write_wav

from ray_whisper.asr import evaluation as ev
from ray_whisper.io.output import SUCCESS, read_results

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("node_loss_run.py")
FILES = 12  # 18 chunks: losses come after the second and third parts (node_loss_run.AFTER_PARTS), files still to do


@pytest.fixture(scope="module")
def files(tmp_path_factory, speech_clips) -> list[tuple[Path, str, int]]:
    """Real speech, (path, reference, chunks): one chunk (11-14 s) and two chunks (33-37 s) in turn, so that with
    batches of 1 a file's chunks straddle the model batches that close two parts; the assemble stage then
    holds a file's first chunk while its second waits, the state that a lost node must not take with it."""
    root = tmp_path_factory.mktemp("node-loss")
    made = []
    for i in range(FILES):
        audio, text = ev.build_long_speech(speech_clips[:1], 31 if i % 2 else 1, seed=i)
        made.append((write_wav(root / f"s{i}.wav", audio), text, 2 if i % 2 else 1))
    return made


def run_losing(tmp_path: Path, files: list[tuple[Path, str, int]], lose: str) -> dict:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,audio\n" + "".join(f"f{i},{path}\n" for i, (path, _, _) in enumerate(files)))
    out, report = tmp_path / "out", tmp_path / "report.json"
    ray_tmp = tempfile.mkdtemp(prefix="rwn", dir="/tmp")  # short: Ray's socket paths must stay below 108 chars
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HELPER), str(manifest), str(out), str(report), lose],
                              cwd=HELPER.parents[1], env=env, capture_output=True, text=True, timeout=900, check=False)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"\nlosing {lose}: {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0 and report.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(report.read_text())
    result["out"], result["log"] = out, proc.stderr
    return result


@pytest.mark.parametrize("lose", ["decode,model", "workers"])
def test_a_lost_worker_node_costs_no_row_and_no_rerun(tmp_path, files, lose):
    """`decode,model`: the decode node, then (after the next part) the model node, each replaced; `workers`:
    both at once, so that no node but the head can hold state the run needs."""
    result = run_losing(tmp_path, files, lose)
    losses = result["losses"]
    # the premise: each loss came while the run still had files to do, and the run outlived it
    assert len(losses) == len(lose.split(",")), losses
    for loss in losses:
        assert 0 < loss["rows_before"] < FILES and loss["run_alive_when_dead"], loss
    assert result.get("exit") == 0, result.get("error") or result["log"][-6000:]

    table = read_results(str(result["out"]))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert table.num_rows == len(rows) == FILES and sorted(rows) == sorted(f"f{i}" for i in range(FILES))
    assert {r["status"] for r in rows.values()} == {"ok"}, [(r["id"], r["status"], r["error"]) for r in rows.values()]
    assert [rows[f"f{i}"]["num_chunks"] for i in range(FILES)] == [chunks for _, _, chunks in files]
    assert (result["out"] / SUCCESS).exists()
    assert ev.wer([text for _, text, _ in files], [rows[f"f{i}"]["text"] for i in range(FILES)]) <= 0.10
    # what the run keeps between batches lives with the driver, on the head: a worker node holds model actors
    # (restarted elsewhere, their batches retried) and task outputs (rebuilt from lineage), nothing else
    for loss in losses:
        on_workers = [a["class_name"] for a in loss["actors_before"] if a["role"] != "head"]
        assert on_workers and all("ModelStage" in name for name in on_workers), loss["actors_before"]
