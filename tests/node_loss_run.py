"""Run the CLI's transcribe on a 3-node local cluster, lose worker nodes mid-run, bring the same capacity
back, and report what the run ended with.

    python tests/node_loss_run.py MANIFEST OUTPUT_DIR REPORT_JSON LOSSES

LOSSES: comma-separated steps, each the nodes lost together: `decode`, `model`, `decode+model`, or `workers`
(every node but the head); `decode,model` loses the decode node, then the model node.

Nodes as in tests/placement_run.py: a head that takes no work (CPU 0), a "decode" node (2 CPUs) and a
"transcribe" node (1 CPU, 1 GPU declared, so the model actor lands there and decoding never does). Once the
run's second part is in OUTPUT_DIR, the first step's nodes are removed without warning (raylet and workers
SIGKILLed, as a preempted spot node goes), and when the GCS has marked them dead, nodes with the same
resources join; the next step comes after the next part. The run itself is `ray_whisper.cli.main`, so the
report holds its exit status.

Run in its own process: it starts its own Ray (RAY_TMPDIR, set by the test, keeps its files and address away
from other Rays). Ray's health check is shortened so that a dead node is noticed in 1-2 s.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from placement_run import free_port, wait_for

SMALL = {"object_store_memory": 200 * 1024**2}
NODES = {
    "decode": {"num_cpus": 2, "labels": {"role": "decode"}, **SMALL},
    "model": {"num_cpus": 1, "num_gpus": 1, "labels": {"role": "transcribe"}, **SMALL},
}
# the loss comes once this many parts are written: past the first, the assemble stage has seen files whose
# other chunks are still to come (a file's chunks can straddle the batches that close two parts)
AFTER_PARTS = 2
FAST_HEALTH_CHECK = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                     "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


def parts(output: str) -> list[str]:
    return sorted(p.name for p in Path(output).glob("part-*.parquet"))


def rows_in(output: str, names: list[str]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(Path(output) / name).metadata.num_rows for name in names)


def main(manifest: str, output: str, report_path: str, lose: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from ray_whisper import cli

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0, "labels": {"role": "head"}, "include_dashboard": True,
            "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
            "_system_config": FAST_HEALTH_CHECK, **SMALL,
        },
    )
    try:
        nodes = {name: cluster.add_node(**args) for name, args in NODES.items()}
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        state_api = {"address": f"http://{cluster.webui_url}", "raise_on_missing_output": False}
        result: dict = {}

        def run():
            try:
                result["exit"] = cli.main(["transcribe", manifest, output, "--batch-size", "1", "--files-per-task", "1",
                                           "--gpus-per-actor", "1", "--max-actors", "1"])
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                result["error"] = repr(e)

        # The run goes in a thread: nodes can only be added and removed from the main thread (signal handlers).
        started = time.time()
        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        roles: dict[str, str] = {}
        losses = []
        for step, names in enumerate(lose.split(",")):
            lost = list(NODES) if names == "workers" else names.split("+")
            want = AFTER_PARTS + step  # one loss per part from the AFTER_PARTS-th on
            wait_for(lambda want=want: len(parts(output)) >= want or not runner.is_alive(), 300, f"{want} parts")
            assert runner.is_alive(), f"the run ended before {want} parts were seen: {result}"
            roles |= {n["NodeID"]: n.get("Labels", {}).get("role", "?") for n in ray.nodes()}
            actors = [{"class_name": a.class_name, "role": roles.get(a.node_id), "state": a.state}
                      for a in list_actors(detail=True, limit=1000, **state_api) if a.state == "ALIVE"]
            loss = {"nodes": lost, "at_s": time.time() - started, "rows_before": rows_in(output, parts(output)),
                    "actors_before": actors}
            for name in lost:
                cluster.remove_node(nodes[name], allow_graceful=False)
            gone = {nodes[name].node_id for name in lost}
            wait_for(lambda gone=gone: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] in gone), 60,
                     "the GCS to mark the node dead")
            loss["dead_after_s"] = time.time() - started - loss["at_s"]
            loss["run_alive_when_dead"] = runner.is_alive()
            for name in lost:
                nodes[name] = cluster.add_node(**NODES[name])
            loss["replaced_after_s"] = time.time() - started - loss["at_s"]
            losses.append(loss)
        runner.join(timeout=420)
        if runner.is_alive():
            raise TimeoutError("the run did not finish in 420 s after the node loss")
        report = {**result, "losses": losses, "wall_s": time.time() - started, "parts": parts(output)}
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
