"""Run the pipeline on a 3-node local cluster shaped like cluster.yaml and report where each kind of work ran.

    python tests/placement_run.py MANIFEST OUTPUT_DIR REPORT_JSON [--gpu-node-after-start]

Nodes: a head that takes no work (CPU 0), a "decode" node (2 CPUs), a "transcribe" node (1 CPU, 1 GPU
declared; no CUDA here, so the model runs on CPU inside the GPU-reserving actor). With
--gpu-node-after-start the GPU node joins only once the model actor is waiting for it, as the autoscaler
adds a GPU node for a pending actor when cluster.yaml's GPU group is at min_workers 0.

Placement comes from Ray's state API (the GCS task and actor tables, served by the dashboard), read after
the run: the node each task attempt and each actor was scheduled on. Run in its own process: it starts its
own Ray (and uses RAY_TMPDIR, set by the test, to keep its files and address away from other Rays).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def main(manifest: str, output: str, report_path: str, gpu_later: bool) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    import ray_whisper

    small = {"object_store_memory": 200 * 1024**2}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0, "labels": {"role": "head"}, "include_dashboard": True,
            "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(), **small,
        },
    )
    gpu_node_args = {"num_cpus": 1, "num_gpus": 1, "labels": {"role": "transcribe"}, **small}
    try:
        cluster.add_node(num_cpus=2, labels={"role": "decode"}, **small)
        if not gpu_later:
            cluster.add_node(**gpu_node_args)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        job_id = ray.get_runtime_context().get_job_id()
        state_api = {"address": f"http://{cluster.webui_url}", "raise_on_missing_output": False}

        def run():
            result["started"] = time.time()
            try:
                result["summary"] = ray_whisper.transcribe(
                    manifest, output, gpus_per_actor=1, max_actors=1, files_per_task=1
                )
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                result["error"] = e
            result["finished"] = time.time()

        # The run goes in a thread: nodes can only be added from the main thread (signal handlers).
        result: dict = {}
        added: dict = {}
        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        if gpu_later:
            pending = wait_for(
                lambda: runner.is_alive() and [
                    a for a in list_actors(filters=[("state", "=", "PENDING_CREATION")], detail=True, **state_api)
                    if "ModelStage" in (a.class_name or "")
                ],
                240, "a model actor waiting for a GPU",
            )
            added = {
                "pending_actor_resources": pending[0].required_resources,
                "cluster_gpus_while_pending": ray.cluster_resources().get("GPU", 0),
            }
            cluster.add_node(**gpu_node_args)
        runner.join(timeout=420)
        if runner.is_alive():
            raise TimeoutError("the run did not finish in 420 s")
        if "error" in result:
            raise result["error"]
        summary = result["summary"]

        roles = {n["NodeID"]: n.get("Labels", {}).get("role", "?") for n in ray.nodes()}

        def snapshot():
            tasks = list_tasks(filters=[("job_id", "=", job_id)], detail=True, limit=10_000, **state_api)
            done = " ".join(t.name for t in tasks if t.state == "FINISHED" and t.node_id)
            return tasks if "chunk_batch" in done and "MapBatches(ModelStage)).submit" in done else None

        tasks = wait_for(snapshot, 60, "task events of the run")  # events reach the GCS asynchronously
        actors = list_actors(filters=[("job_id", "=", job_id)], detail=True, limit=1000, **state_api)
        report = {
            "summary": summary.as_dict(),
            "roles": roles,
            "actors": [{"class_name": a.class_name, "role": roles.get(a.node_id), "state": a.state,
                        "required_resources": a.required_resources} for a in actors],
            "tasks": [{"name": t.name, "type": t.type, "state": t.state, "role": roles.get(t.node_id),
                       "required_resources": t.required_resources} for t in tasks],
            "wall_s": result["finished"] - result["started"],
            "gpu_node_added": added,
        }
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(*args, gpu_later="--gpu-node-after-start" in sys.argv)
