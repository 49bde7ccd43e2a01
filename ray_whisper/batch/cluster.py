"""Which Ray a run uses: the cluster in RAY_ADDRESS, or a local one that goes away with its driver.

Ray's local head fate-shares its GCS and raylet with the driver, but its agents (dashboard agent, runtime-env
agent) outlive a driver killed with SIGKILL by a minute or more, still listening. So a local Ray gets a reaper:
a small process, started before Ray, that holds a pipe from the driver and keeps a list of the driver's
descendants; when the pipe closes (the driver exited or was killed), it ends whichever of them are left.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil

from ..errors import ClusterError, one_line

log = logging.getLogger(__name__)

SNAPSHOT_S = 1.0  # how often the reaper refreshes its list of the driver's processes
PROBE_S = 5.0  # how long RAY_ADDRESS may take to accept a connection before the run gives up (Ray waits 60 s)
WATCH_S = 1.0  # how often a run checks that its cluster's GCS still accepts connections
LOST_AFTER_S = 5.0  # a GCS refusing connections this long is gone: the run stops (Ray's own driver waits 60 s)
RESUME = "what finished is saved; rerun the same command once Ray is up to transcribe the rest"


def connect(dashboard: bool = False) -> bool:
    """Join the cluster in RAY_ADDRESS when set (ray job submit sets it), else start a local Ray (with its
    dashboard only when asked: on a small machine it takes ~2.5 s of start-up and CPU from the model).
    Returns whether this call started a local Ray. Raises ClusterError, in seconds where it can, when Ray
    cannot be reached or started. A SIGTERM handler the caller set survives (ray.init replaces it)."""
    import ray  # ~1 s: imported when a run starts, not when the CLI parses its flags

    if ray.is_initialized():
        return False
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        return _connect(ray, dashboard)
    finally:
        if main and callable(handler):
            signal.signal(signal.SIGTERM, handler)


def _connect(ray, dashboard: bool) -> bool:
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        _probe(address)
        try:
            ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        except Exception as e:
            raise ClusterError(f"could not join the Ray cluster at RAY_ADDRESS={address}: {one_line(e)}; "
                               f"{RESUME}") from e
        return False
    _start_reaper()
    # Ray 2.60 turns token authentication on for a local Ray and warns that it did; said once here instead
    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # "local": a new instance, never one that `ray start` left running here (that one needs RAY_ADDRESS)
        ray.init(address="local", log_to_driver=True, include_dashboard=dashboard, logging_level=logging.WARNING)
    except Exception as e:
        raise ClusterError(f"could not start a local Ray: {one_line(e)}; {RESUME}") from e
    finally:
        quiet.setLevel(level)
    log.info("started a local Ray (%d CPUs, token authentication on%s); set RAY_ADDRESS to use a cluster",
             int(ray.cluster_resources().get("CPU", 0)), ", dashboard on http://127.0.0.1:8265" if dashboard else "")
    return True


def stop() -> None:
    """Leave Ray now: the local Ray this process started is stopped, a cluster joined is only left. Without
    Ray's exit waits: at the interpreter's exit ray.shutdown() sleeps 0.5 s for late log lines, then gives
    the autoscaler's monitor 1 s to exit on SIGTERM, which it never does in time (its handler reports its
    own death through the GCS stopped just before it). The monitor holds nothing of a run: it is killed
    first, and the rest stop in ~0.1 s."""
    import ray

    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    kill_monitor = getattr(node, "kill_monitor", None)  # private in Ray 2.60; where it is missing Ray waits
    if callable(kill_monitor):
        try:
            kill_monitor(check_alive=False)
        except Exception:  # the shutdown below stops it anyway, a second later
            log.debug("could not stop Ray's autoscaler monitor", exc_info=True)
    ray.shutdown()


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of "host:port" or "ray://host:port"; None for "auto" and what is not an address."""
    host, sep, port = address.split("://", 1)[-1].split("/", 1)[0].rpartition(":")
    return (host.strip("[]"), int(port)) if sep and host and port.isdigit() else None


def _probe(address: str) -> None:
    """Fail in seconds when nothing accepts connections at RAY_ADDRESS (ray.init retries for a minute)."""
    where = _host_port(address)
    if where is None:
        return
    try:
        socket.create_connection(where, timeout=PROBE_S).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise ClusterError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({reason}); {RESUME}") from e


@contextmanager
def watching() -> Iterator[Callable[[], str | None]]:
    """While the block runs, check every WATCH_S that the cluster's GCS accepts connections; once it has
    refused them for LOST_AFTER_S, interrupt the main thread (SIGINT) and let the returned function say what
    happened (None until then). A run stops in seconds with its own line, instead of Ray's driver exiting
    after a minute with a traceback, or hanging."""
    import ray

    where = _host_port(ray.get_runtime_context().gcs_address or "")
    lost: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        refused_since = None
        while not stop.wait(WATCH_S):
            try:
                socket.create_connection(where, timeout=WATCH_S).close()
                refused_since = None
                continue
            except OSError:
                refused_since = refused_since or time.monotonic()
            if time.monotonic() - refused_since >= LOST_AFTER_S:
                lost.append(f"the Ray cluster went away under the run (its GCS at {where[0]}:{where[1]} has "
                            f"refused connections for {LOST_AFTER_S:.0f} s)")
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return

    thread = threading.Thread(target=watch, name="ray-whisper-gcs-watch", daemon=True)
    if where is not None and threading.current_thread() is threading.main_thread():
        thread.start()
    try:
        yield lambda: lost[0] if lost else None
    finally:
        stop.set()


_reaper: subprocess.Popen | None = None


def _start_reaper() -> None:
    global _reaper
    if _reaper is None or _reaper.poll() is not None:
        # its own session: a Ctrl-C in the terminal reaches the driver, not the reaper. Not the driver's
        # output either: a caller reading it (subprocess.run, a shell's $(...)) would wait for the reaper too
        _reaper = subprocess.Popen(
            [sys.executable, "-m", "ray_whisper.batch.cluster", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            close_fds=True,
        )


def reap(driver_pid: int) -> None:
    """The reaper's loop (run as `python -m ray_whisper.batch.cluster <driver pid>`): until stdin closes, remember
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
