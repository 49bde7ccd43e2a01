"""Which Ray a run uses: the cluster in RAY_ADDRESS, or a local one that goes away with its driver.

Ray's local head fate-shares its GCS and raylet with the driver, but its agents (dashboard agent, runtime-env
agent) outlive a driver killed with SIGKILL by a minute or more, still listening. So a local Ray gets a reaper:
a small process, started before Ray, that holds a pipe from the driver and keeps a list of the driver's
descendants; when the pipe closes (the driver exited or was killed), it ends whichever of them are left.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import psutil

log = logging.getLogger(__name__)

SNAPSHOT_S = 1.0  # how often the reaper refreshes its list of the driver's processes


def connect(dashboard: bool = False) -> bool:
    """Join the cluster in RAY_ADDRESS when set (ray job submit sets it), else start a local Ray (with its
    dashboard only when asked: on a small machine it takes ~2.5 s of start-up and CPU from the model).
    Returns whether this call started a local Ray."""
    import ray  # ~1 s: imported when a run starts, not when the CLI parses its flags

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        return False
    _start_reaper()
    # Ray 2.60 turns token authentication on for a local Ray and warns that it did; said once here instead
    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # "local": a new instance, never one that `ray start` left running here (that one needs RAY_ADDRESS)
        ray.init(address="local", log_to_driver=True, include_dashboard=dashboard, logging_level=logging.WARNING)
    finally:
        quiet.setLevel(level)
    log.info("started a local Ray (%d CPUs, token authentication on%s); set RAY_ADDRESS to use a cluster",
             int(ray.cluster_resources().get("CPU", 0)), ", dashboard on http://127.0.0.1:8265" if dashboard else "")
    return True


_reaper: subprocess.Popen | None = None


def _start_reaper() -> None:
    global _reaper
    if _reaper is None or _reaper.poll() is not None:
        # its own session: a Ctrl-C in the terminal reaches the driver, not the reaper
        _reaper = subprocess.Popen(
            [sys.executable, "-m", "ray_whisper.cluster", str(os.getpid())],
            stdin=subprocess.PIPE, start_new_session=True, close_fds=True,
        )


def reap(driver_pid: int) -> None:
    """The reaper's loop (run as `python -m ray_whisper.cluster <driver pid>`): until stdin closes, remember
    the driver's descendants; then end those still running, the same processes (pid and start time) only."""
    import selectors

    driver = psutil.Process(driver_pid)
    seen: dict[int, float] = {}
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    while True:
        try:
            for child in driver.children(recursive=True):
                seen.setdefault(child.pid, child.create_time())
        except psutil.Error:
            break  # the driver is gone
        if selector.select(timeout=SNAPSHOT_S) and not sys.stdin.buffer.read1(1):
            break  # EOF: the driver exited
    time.sleep(0.5)  # a driver that exits cleanly stops its Ray itself; give it the chance
    left = []
    for pid, started in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started and proc.pid != os.getpid():
                proc.terminate()
                left.append(proc)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(left, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    reap(int(sys.argv[1]))
