"""`ray job submit` end to end, as on a cluster: a real Ray head started with `ray start`, the repo shipped
as the job's working dir (trimmed by .rayignore), jobs/transcribe.py as the entrypoint. The job must
succeed, write one Parquet row per manifest row, and its log must show progress as periodic log lines
(no bars: the job's stdout is not a terminal) and the run's summary.

Isolation: the head gets its own --temp-dir (and RAY_TMPDIR, so its "current cluster" address file is
not /tmp/ray's and no other ray.init() on the machine can join it) and its own ports. It is stopped by
signalling its `ray start --block` process (which stops the node), checking that its process group is gone,
and ending, by pid, any process still running from its temp dir. Never `ray stop`: that kills every Ray on
the machine, the session's `ray_session` and other people's test runs included.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import DATA, REFS

from ray_whisper.asr import evaluation as ev

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or pytest.fail("no `ray` executable"))


def processes_under(temp_dir: str) -> list:
    """Processes of this head: their command line or working directory lies under its temp dir."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        except (psutil.Error, TypeError):
            continue
        if temp_dir in text and proc.pid != os.getpid():
            found.append(proc)
    return found


class LocalHead:
    """`ray start --head --block` in its own process group, temp dir and ports."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rwj", dir="/tmp")  # short: unix socket paths < 108 chars
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # Token authentication on, as the README's sequence runs it (RAY_AUTH_MODE=token for every ray
        # command), with a token of the test's own instead of ~/.ray/auth_token.
        # PATH: the entrypoint's `python` is this environment's, as in a user's activated virtualenv.
        # HF_HUB_DISABLE_PROGRESS_BARS: as cluster.yaml sets it on every node (else transformers draws a
        # "Loading weights" tqdm bar into the log each time a model actor starts).
        # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S: on SIGTERM, `ray start --block` first drains the node for up
        # to 30 s, and Ray Data's detached helper actors keep it from ever draining: stop at once instead.
        self.token = secrets.token_hex(32)
        token = Path(self.temp_dir) / "auth_token"
        token.write_text(self.token)
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "RAY_TMPDIR": self.temp_dir, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")  # noqa: SIM115 - open while the head runs
        self.proc = subprocess.Popen(
            [
                ray_cli(), "start", "--head", "--block", f"--port={self.gcs_port}", "--num-cpus=2",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
            ],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def client(self, timeout_s: float = 120):
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                # this process runs without RAY_AUTH_MODE (the session's local Ray), so it sends the token itself
                client = JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})
                client.list_jobs()
                return client
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def read_log(self) -> str:
        return (Path(self.temp_dir) / "ray_start.log").read_text()[-5000:]

    def group_members(self) -> list:
        """Live processes of the head's process group (zombies are dead: they only wait to be reaped)."""
        import psutil

        members = []
        for proc in psutil.process_iter(["status"]):
            if _pgid(proc.pid) == self.proc.pid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        return members

    def group_alive(self) -> bool:
        self.proc.poll()  # reap `ray start` itself once it exits
        return bool(self.group_members())

    def stop(self) -> int:
        """SIGTERM to `ray start --block`: it stops its node's processes (GCS, raylet, dashboard, workers,
        all in its process group). SIGKILL to the group if anything lingers, then SIGKILL by pid to anything
        else running from this head's temp dir (the job's entrypoint runs in a session of its own, with its
        working dir there). Returns how many processes needed a SIGKILL."""
        import psutil

        killed = 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if lingering := self.group_members():
            print("\nstill running 20 s after SIGTERM:", *(_describe(p) for p in lingering), sep="\n  ")
            killed += len(lingering)
            os.killpg(self.proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.group_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        left = processes_under(self.temp_dir)
        for proc in left:
            try:
                proc.kill()
                killed += 1
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return killed


def _describe(proc) -> str:
    try:
        return f"{proc.pid} {proc.status()} " + " ".join(proc.cmdline())[:150]
    except Exception:
        return str(proc.pid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@pytest.fixture
def head():
    head = LocalHead()
    try:
        yield head
    finally:
        killed = head.stop()
        assert not head.group_alive() and not processes_under(head.temp_dir), "the test's Ray head survived"
        print(f"\nhead stopped ({killed} process(es) needed SIGKILL)")


def test_working_dir_package_is_small(tmp_path):
    """What `--working-dir .` uploads: the package Ray builds from the repo, minus .gitignore / .rayignore."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "pkg.zip"
    create_package(str(ROOT), package, include_gitignore=True)
    names = zipfile.ZipFile(package).namelist()
    assert "jobs/transcribe.py" in names and "ray_whisper/batch/pipeline.py" in names
    assert not [n for n in names if n.startswith(".git/") or "__pycache__" in n or ".egg-info" in n], names
    assert package.stat().st_size < 10 * 1024**2, f"{package.stat().st_size / 1e6:.1f} MB: extend .rayignore"


@pytest.mark.slow
def test_ray_job_submit_runs_the_entrypoint_and_logs_progress(head, tmp_path):
    from ray.job_submission import JobStatus

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"id,audio,language\njfk,{DATA / 'jfk.flac'},en\n")
    out = tmp_path / "out"
    client = head.client()
    submission_id = f"rw-test-{os.getpid()}-{int(time.time())}"

    started = time.perf_counter()
    submit = subprocess.run(
        [
            ray_cli(), "job", "submit", "--address", head.address, "--working-dir", ".",
            "--submission-id", submission_id, "--no-wait",
            # a progress line every 3 s instead of 10 s, so even a short job logs several
            "--runtime-env-json", json.dumps({"env_vars": {"RAY_WHISPER_PROGRESS_INTERVAL_S": "3"}}),
            "--",
            "python", "jobs/transcribe.py", str(manifest), str(out),
        ],
        cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    print("\n" + "\n".join(line for line in (submit.stdout + submit.stderr).splitlines() if "ackage" in line))
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (status := client.get_job_status(submission_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline, f"job still {status} after {JOB_TIMEOUT_S}s"
            time.sleep(2)
        job_s = time.perf_counter() - started
        logs = subprocess.run(
            [ray_cli(), "job", "logs", "--address", head.address, submission_id],
            env=head.env, capture_output=True, text=True, timeout=60, check=False,
        ).stdout
        info = client.get_job_info(submission_id)
        (tmp_path / "job.log").write_text(logs)
        assert status == JobStatus.SUCCEEDED, f"{status}: {info.message}\n{logs[-6000:]}"
    finally:
        if client.get_job_status(submission_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            client.stop_job(submission_id)
    print(f"\njob {submission_id}: {status} in {job_s:.1f} s (submit to SUCCEEDED)")

    # the working dir was trimmed by .rayignore / .gitignore, and the job ran from it
    uri = (info.runtime_env or {}).get("working_dir", "")
    assert uri.startswith("gcs://"), info.runtime_env

    # output: one row per manifest row, the right transcript
    table = pq.read_table(out)
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    assert row["id"] == "jfk" and row["status"] == "ok"
    assert ev.wer([REFS["jfk.flac"]["text"]], [row["text"]]) <= 0.05

    # progress as log lines, not bars: files done of the total every few seconds, then the CLI's summary
    blocks = re.findall(r"^(\S+ \S+) INFO ray_whisper\.batch\.report: files done: (\d+)/1 ", logs, re.MULTILINE)
    assert len(blocks) >= 2, logs[-4000:]
    times = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t, _ in blocks]
    ticks = times[:-1]  # the last line comes when the file is done, whenever that is
    assert all((b - a).total_seconds() >= 2.5 for a, b in pairwise(ticks)), "progress is not periodic"
    assert blocks[-1][1] == "1" and all(n == "0" for _, n in blocks[:-1])
    assert "logging_progress" not in logs, "Ray Data's own progress (chunks, blocks) is not shown"
    assert "\r" not in logs and "it/s]" not in logs, "a progress bar was drawn into the job log"
    assert re.search(r"^files ok: 1\s+failed: 0$", logs, re.MULTILINE), logs[-3000:]
    assert "real-time factor" in logs and f"output: {out}" in logs
    print(f"progress blocks in the job log: {len(blocks)} ({', '.join(b[0] for b in blocks)})")
