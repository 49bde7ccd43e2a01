"""Where the work runs on a cluster shaped like cluster.yaml: a head that takes no work, a CPU node and a
node with a (declared) GPU. The model actor must land on the GPU node and decoding on the CPU node; with
the GPU node joining only after the run started (an autoscaling group at min_workers 0), the pool must wait
for it instead of failing or falling back to CPU actors.

Each run is its own process with its own 3-node Ray (tests/placement_run.py): only one Ray can be connected
per process, and the session's `ray_session` must not be disturbed. RAY_TMPDIR keeps that Ray's session
files and its "current cluster" address file out of /tmp/ray, so no other ray.init() on the machine can
join it. Placement is read from Ray's state API (the GCS's record of the node each task and actor ran on).
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

import pyarrow.parquet as pq
import pytest
from conftest import DATA, REFS

from ray_whisper.asr import evaluation as ev

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("placement_run.py")


def run_on_three_nodes(tmp_path: Path, *flags: str) -> dict:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"id,audio\njfk,{DATA / 'jfk.flac'}\n")
    out, report = tmp_path / "out", tmp_path / "report.json"
    # short: Ray's unix socket paths under it must stay below 108 characters
    ray_tmp = tempfile.mkdtemp(prefix="rwp", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(HELPER), str(manifest), str(out), str(report), *flags],
            cwd=HELPER.parents[1], env=env, capture_output=True, text=True, timeout=600, check=False,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"\n3-node run {' '.join(flags) or '(GPU node from the start)'}: {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(report.read_text())
    result["table"] = pq.read_table(out)
    result["log"] = proc.stderr
    return result


def model_actors(result):
    return [a for a in result["actors"] if "ModelStage" in a["class_name"]]


def tasks_named(result, part):
    return [t for t in result["tasks"] if part in t["name"] and t["state"] == "FINISHED"]


def check_placement(result):
    # the transcript is right: the run really went through the actor
    table = result["table"]
    assert table.num_rows == 1 and table["status"].to_pylist() == ["ok"]
    assert ev.wer([REFS["jfk.flac"]["text"]], table["text"].to_pylist()) <= 0.05

    actors = model_actors(result)
    assert actors, "no model actor recorded"
    for actor in actors:
        assert actor["role"] == "transcribe", actor
        assert actor["required_resources"] == {"GPU": 1.0, "CPU": 1.0}
    batches = tasks_named(result, "MapBatches(ModelStage)).submit")
    assert batches and {t["role"] for t in batches} == {"transcribe"}

    decodes = tasks_named(result, "MapBatches(chunk_batch)")
    assert decodes, "no decode task recorded"
    for task in decodes:
        assert task["role"] == "decode", task  # never the GPU node, never the head
        assert task["required_resources"] == {"CPU": 1.0}
    # the head (CPU 0) ran nothing that needs a CPU
    assert not [t for t in result["tasks"] if t["role"] == "head" and t["required_resources"].get("CPU")]


def test_model_actor_on_the_gpu_node_decoding_on_the_cpu_node(tmp_path):
    check_placement(run_on_three_nodes(tmp_path))


def test_gpu_node_joining_after_the_start_gets_the_waiting_model_actor(tmp_path):
    """What cluster.yaml's GPU group at min_workers 0 relies on: the job starts on a cluster with no GPU,
    the model actor waits for one (the autoscaler's cue), and runs once a GPU node joins."""
    result = run_on_three_nodes(tmp_path, "--gpu-node-after-start")
    assert result["gpu_node_added"]["cluster_gpus_while_pending"] == 0
    assert result["gpu_node_added"]["pending_actor_resources"] == {"GPU": 1.0, "CPU": 1.0}
    check_placement(result)
