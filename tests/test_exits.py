"""Exit statuses a Job controller can trust when Ray itself fails: the CLI as a real process, Ray unreachable
before the run, and Ray's GCS killed under it. Both are exit 2 with one line that says what happened and that
the same command resumes, in seconds rather than after Ray's minute of retries."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from ray_whisper.io.output import SUCCESS, OutputDir

from conftest import DATA
from test_faults import closed_port_for_ray, start_cli, ten_files, wait_for_progress, write_manifest  # noqa: F401

pytestmark = pytest.mark.slow


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_ray_address_with_nobody_listening_exits_2_in_seconds(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [DATA / "jfk.flac"])
    address = f"127.0.0.1:{closed_port_for_ray()}"
    started = time.monotonic()
    proc = start_cli(manifest, tmp_path / "out", {"RAY_ADDRESS": address})
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("the run was still waiting for Ray after 90 s")
    assert proc.returncode == 2, err
    elapsed = time.monotonic() - started
    assert "Traceback" not in err, err
    assert re.fullmatch(rf"ray-whisper: error: cannot reach the Ray cluster at RAY_ADDRESS={address} \(connection "
                        r"refused\); what finished is saved; rerun the same command once Ray is up to transcribe the "
                        r"rest", last_line(err)), last_line(err)
    assert elapsed < 30, elapsed  # not Ray's 60 s of "Failed to connect to GCS"


def test_ray_dying_under_a_run_exits_2_saying_what_is_saved_and_that_a_rerun_resumes(tmp_path, ten_files):
    """The run's own local Ray loses its GCS (killed, as the OOM killer would) after a file is saved."""
    import psutil

    manifest = write_manifest(tmp_path / "m.csv", ten_files)
    out = tmp_path / "out"
    proc = start_cli(manifest, out, {"RAY_ADDRESS": ""}, "--batch-size", "1")  # a part per 4 files: 3 parts
    try:
        done, _ = wait_for_progress(proc, 1)
        assert done < 10, "the run had finished: the test proves nothing"
        (gcs,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name().startswith("gcs_server")]
        gcs.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        err = proc.stderr.read()
        rc = proc.wait(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 2, err
    line = last_line(err)
    found = re.fullmatch(r"ray-whisper: error: the Ray cluster went away under the run \(its GCS at \S+ has refused "
                         r"connections for 5 s\): at least (\d+) of this run's 10 file\(s\) are saved in \S+; rerun "
                         r"the same command once Ray is up to transcribe the rest", line)
    assert found, err[-3000:]
    assert OutputDir.open(str(out)).scan().num_rows >= int(found.group(1)) >= 1
    assert not (out / SUCCESS).exists()
    assert elapsed < 30, elapsed  # not Ray's minute of retries


def test_stop_ends_the_local_ray_it_started_without_rays_exit_waits():
    """batch.cluster.stop, as a finished CLI run calls it: every process of the local Ray is gone when it
    returns, and it does not wait out Ray's 1 s grace for the autoscaler's monitor (whose SIGTERM handler
    reports through the GCS stopped before it) nor Ray's 0.5 s exit sleep."""
    import sys

    script = """
import time, psutil
from ray_whisper.batch.cluster import connect, stop

assert connect()
me = psutil.Process()
family = [p for p in me.children(recursive=True) if "ray_whisper.batch.cluster" not in " ".join(p.cmdline())]
names = sorted({p.name() for p in family})
monitor = any("autoscaler/_private/monitor" in " ".join(p.cmdline()) for p in family)
started = time.monotonic()
stop()
took = time.monotonic() - started
left = [p.name() for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
print(repr((names, monitor, took, left)))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    names, monitor, took, left = eval(proc.stdout.strip().splitlines()[-1])
    assert any(n.startswith("gcs_server") for n in names) and "raylet" in names and monitor, names
    assert not left, left
    assert took < 0.9, took  # Ray's own shutdown waited 1.0 s for the monitor alone
