"""One writer per output directory (io/lease.py): the lease on a local disk and on S3 (the moto server of
test_s3, over HTTP), held by real processes where a holder's life matters, then the CLI end to end: two runs
started together, a second run beside a live one, SIGTERM. Each acquirer race has exactly one winner."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

import ray_whisper
from ray_whisper.batch import pipeline
from ray_whisper.config import StorageOptions
from ray_whisper.errors import ManifestError, OutputBusyError, OutputError
from ray_whisper.io.output import LEASE, SUCCESS, OutputDir, read_results

from test_faults import ROOT, start_cli, ten_files, wait_for_progress, write_manifest  # noqa: F401
from test_s3 import boto, moto_server

BUSY = re.compile(r"(?P<out>\S+) is in use by run (?P<run>\S+) on host (?P<host>\S+) \(pid (?P<pid>\d+)\), last "
                  r"heartbeat (?P<age>\d+) s ago; wait for it to finish or give another OUTPUT_DIR \(a lease whose run "
                  r"died expires (?P<expiry>[\d.]+) s after its last heartbeat\)")

# A holder in a process of its own: takes the lease, says so, and holds it until killed.
HOLD = """
import sys, time
from ray_whisper.config import StorageOptions
from ray_whisper.io.output import OutputDir
uri, endpoint, run, beat, expiry = sys.argv[1:]
out = OutputDir.open(uri, StorageOptions(s3_endpoint_url=endpoint or None))
with out.held(run, heartbeat_s=float(beat), expiry_s=float(expiry)):
    print("held", flush=True)
    time.sleep(600)
"""


def hold(uri: str, run: str, endpoint: str = "", beat: float = 0.2, expiry: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, uri, endpoint, run, str(beat), str(expiry)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "held":
        proc.kill()
        pytest.fail(f"the holder did not take the lease: {line}{proc.stderr.read()}")
    return proc


def refusal(uri: str, options: StorageOptions | None = None) -> str:
    """What a run is told when it tries to take the lease of `uri` (the test fails if it gets it)."""
    with pytest.raises(OutputBusyError) as refused, OutputDir.open(uri, options).held("second-run"):
        pass
    return str(refused.value)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def race(uri: str, options: StorageOptions | None, n: int = 6) -> tuple[list, list]:
    """`n` threads open `uri` and take its lease at the same moment: (the held contexts, the refusals)."""
    barrier, won, refused = threading.Barrier(n), [], []

    def one(i: int) -> None:
        context = OutputDir.open(uri, options).held(f"racer-{i}")
        barrier.wait()
        try:
            context.__enter__()
            won.append(context)
        except OutputBusyError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


# ---------------------------------------------------------------- a local disk, no Ray


def test_a_second_run_is_refused_with_one_line_naming_the_holder_and_the_lease_goes_with_the_run(tmp_path):
    out = OutputDir.open(str(tmp_path))
    with out.held("20261204T000000-aaaaaa") as lease:
        record = json.loads((tmp_path / LEASE).read_text())
        assert record["run_id"] == "20261204T000000-aaaaaa" and record["pid"] == os.getpid()
        message = refusal(str(tmp_path))
        found = BUSY.fullmatch(message)
        assert found, message
        assert (found["run"], int(found["pid"]), found["expiry"]) == (lease.run_id, os.getpid(), "60")
    assert not (tmp_path / LEASE).exists()
    with OutputDir.open(str(tmp_path)).held("20261204T000002-cccccc"):  # free again
        pass


def test_the_lease_is_released_when_the_run_fails_or_is_interrupted(tmp_path):
    with pytest.raises(ManifestError):  # fails after the lease is taken (the manifest is read under it)
        pipeline.transcribe(str(tmp_path / "missing.csv"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / LEASE).exists()
    # Ctrl-C, and SIGTERM which the CLI turns into one
    with pytest.raises(KeyboardInterrupt), OutputDir.open(str(tmp_path / "out")).held("r1"):
        raise KeyboardInterrupt
    assert not (tmp_path / "out" / LEASE).exists()


def test_racing_acquirers_on_a_local_disk_have_exactly_one_winner(tmp_path):
    for _ in range(5):
        won, refused = race(str(tmp_path), None)
        assert len(won) == 1 and len(refused) == 5, (won, refused)
        won[0].__exit__(None, None, None)


def test_a_live_holder_in_another_process_keeps_its_lease_past_the_expiry(tmp_path):
    holder = hold(str(tmp_path), "live-run", beat=0.2, expiry=1.0)
    try:
        time.sleep(2.5)  # past the expiry: only the heartbeat keeps it
        assert re.search(rf"by run live-run on host \S+ \(pid {holder.pid}\)", refusal(str(tmp_path)))
    finally:
        kill(holder)


def test_a_holder_killed_with_sigkill_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    holder = hold(str(tmp_path), "killed-run", expiry=600)
    kill(holder)
    assert json.loads((tmp_path / LEASE).read_text())["run_id"] == "killed-run"  # left behind, heartbeat fresh
    with OutputDir.open(str(tmp_path)).held("next"):
        assert json.loads((tmp_path / LEASE).read_text())["run_id"] == "next"
    assert f"from run killed-run (its process {holder.pid} on this machine is gone)" in caplog.text


def test_a_lease_from_another_machine_is_taken_over_only_once_its_heartbeat_is_older_than_its_expiry(tmp_path):
    lease = tmp_path / LEASE
    lease.parent.mkdir()
    lease.write_text(json.dumps({"run_id": "far-run", "host": "elsewhere", "pid": 1, "machine": "another-boot/pid:[1]",
                                 "pid_started": 0, "heartbeat_s": 10, "expiry_s": 60, "token": "t"}))
    assert "by run far-run on host elsewhere (pid 1), last heartbeat 0 s ago" in refusal(str(tmp_path))
    os.utime(lease, (time.time() - 61, time.time() - 61))  # its holder stopped renewing 61 s ago
    with OutputDir.open(str(tmp_path)).held("near"):
        assert json.loads(lease.read_text())["run_id"] == "near"


def test_a_run_whose_lease_was_taken_over_does_not_commit(tmp_path):
    out = OutputDir.open(str(tmp_path))
    with out.held("slow-run", heartbeat_s=600, expiry_s=1) as lease:
        os.utime(tmp_path / LEASE, (time.time() - 5, time.time() - 5))  # as if it had stalled for 5 s
        with OutputDir.open(str(tmp_path)).held("new-run"):
            with pytest.raises(OutputError, match="this run lost the lease of .*: run new-run holds it now"):
                out.commit("slow-run", pa.table({"id": pa.array([], pa.string()), "part": pa.array([], pa.string())}),
                           {})
            lease.renew()
            assert lease.lost
        assert not (tmp_path / SUCCESS).exists()


def test_a_live_runs_temporary_part_is_never_deleted_by_another_run(tmp_path):
    temp = tmp_path / ".rw-tmp-part-20261204T000000-aaaaaa-0001.parquet.tmp"
    holder = hold(str(tmp_path), "20261204T000000-aaaaaa")
    try:
        temp.write_bytes(b"PAR1 being written")
        manifest = write_manifest(tmp_path / "m.csv", [ROOT / "tests" / "data" / "jfk.flac"])
        with pytest.raises(OutputBusyError):
            ray_whisper.transcribe(str(manifest), str(tmp_path))
        assert temp.read_bytes() == b"PAR1 being written"
    finally:
        kill(holder)
    # the holder is gone: the next run takes over, removes the dead run's temporary part, never its own
    out = OutputDir.open(str(tmp_path))
    with out.held("20261204T000001-bbbbbb"):
        own = tmp_path / ".rw-tmp-part-20261204T000001-bbbbbb-0002.parquet.tmp"
        own.write_bytes(b"PAR1 ours")
        out.begin(pa.table({"id": ["a"], "audio": ["a.wav"]}), "fp", overwrite=False, retry_errors=False)
        assert not temp.exists() and own.exists()


# ---------------------------------------------------------------- S3: conditional requests on the moto server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    root = tmp_path_factory.mktemp("lease-s3")
    with moto_server(root / "moto.log") as url:
        boto(url).create_bucket(Bucket="leases")
        yield {"url": url, "options": StorageOptions(s3_endpoint_url=url), "client": boto(url)}


def test_s3_refuses_a_second_run_renews_and_releases(s3):
    uri = "s3://leases/refuse"
    out = OutputDir.open(uri, s3["options"])
    with out.held("s3-run", heartbeat_s=0.3, expiry_s=2):
        found = BUSY.fullmatch(refusal(uri, s3["options"]))
        assert found and (found["out"], found["run"], int(found["pid"])) == (uri, "s3-run", os.getpid())
        time.sleep(3)  # past the expiry: the heartbeat's conditional PUTs keep it live
        refusal(uri, s3["options"])
    assert "Contents" not in s3["client"].list_objects_v2(Bucket="leases", Prefix="refuse/_ray_whisper/lease")


def test_s3_racing_acquirers_have_exactly_one_winner(s3):
    for i in range(5):
        won, refused = race(f"s3://leases/race{i}", s3["options"])
        assert len(won) == 1 and len(refused) == 5, (won, refused)
        won[0].__exit__(None, None, None)


def test_s3_a_killed_holder_is_taken_over_and_a_stale_lease_by_one_of_many(s3):
    uri = "s3://leases/takeover"
    holder = hold(uri, "killed-run", endpoint=s3["url"], expiry=600)
    kill(holder)
    with OutputDir.open(uri, s3["options"]).held("next") as lease:
        assert lease.store.read().record["run_id"] == "next"
    # a lease from another machine, 1 s of expiry, not renewed: aged on the store's clock, then raced for
    record = {"run_id": "far-run", "host": "elsewhere", "pid": 1, "machine": "another-boot/pid:[1]", "expiry_s": 1}
    s3["client"].put_object(Bucket="leases", Key="takeover/_ray_whisper/lease.json", Body=json.dumps(record).encode())
    assert "by run far-run on host elsewhere" in refusal(uri, s3["options"])
    time.sleep(2.5)
    won, refused = race(uri, s3["options"])
    assert len(won) == 1 and len(refused) == 5, (won, refused)
    won[0].__exit__(None, None, None)


# ---------------------------------------------------------------- the CLI end to end (real model, Ray)


def _parts_runs(out: Path) -> set[str]:
    return {re.match(r"part-(\d{8}T\d{6}-[0-9a-f]{6})-", p.name).group(1) for p in out.glob("part-*.parquet")}


@pytest.mark.slow
def test_two_runs_started_together_one_transcribes_the_other_exits_2_with_one_line(tmp_path, ten_files, ray_session):
    manifest = write_manifest(tmp_path / "m.csv", ten_files[:3])
    out = tmp_path / "out"
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    procs = [start_cli(manifest, out, env), start_cli(manifest, out, env)]
    results = []
    try:
        for proc in procs:  # bounded: two runs that both go ahead can hold each other's CPUs for good
            _, err = proc.communicate(timeout=300)
            results.append((proc.returncode, err))
    except subprocess.TimeoutExpired:
        pytest.fail("two runs on one OUTPUT_DIR were both still going after 300 s: neither was refused")
    finally:
        for proc in procs:
            kill(proc)
    assert sorted(rc for rc, _ in results) == [0, 2], results
    (err,) = [err for rc, err in results if rc == 2]
    assert len(err.strip().splitlines()) == 1, err
    found = BUSY.fullmatch(err.strip().removeprefix("ray-whisper: error: "))
    assert found and int(found["pid"]) in {p.pid for p in procs}, err
    assert len(_parts_runs(out)) == 1  # every part is the winner's: nothing was transcribed twice
    table = read_results(str(out))
    assert sorted(table["id"].to_pylist()) == ["f0", "f1", "f2"]
    assert not (out / LEASE).exists()  # released after success


@pytest.mark.slow
def test_a_second_run_beside_a_live_one_refuses_and_sigterm_releases_the_lease(tmp_path, ten_files, ray_session):
    manifest = write_manifest(tmp_path / "m.csv", ten_files[:5])
    out = tmp_path / "out"
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    first = start_cli(manifest, out, env, "--batch-size", "1")  # a part every 4 files: the first comes at 4 of 5
    try:
        done, _ = wait_for_progress(first, 1)
        assert done < 5, "the first run finished before the second started: the test proves nothing"
        second = start_cli(manifest, out, env)
        err = second.stderr.read()
        assert second.wait(timeout=120) == 2, err
        found = BUSY.fullmatch(err.strip().removeprefix("ray-whisper: error: "))
        assert found and int(found["pid"]) == first.pid, err
        first.send_signal(signal.SIGTERM)
        rest = first.stderr.read()
        assert first.wait(timeout=120) == 130, rest
    finally:
        kill(first)
    assert not (out / LEASE).exists()  # released on SIGTERM: the same command resumes at once
    assert len(_parts_runs(out)) == 1  # the refused run wrote nothing
