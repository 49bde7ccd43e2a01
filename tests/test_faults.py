"""Faults on a real local Ray: a killed model actor, a killed driver then a rerun, retrying error rows,
and the exit status. Each test ends with exactly one row per manifest row."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ray_whisper
from ray_whisper import cli
from ray_whisper.asr import evaluation as ev
from ray_whisper.io.output import SUCCESS, IncompleteOutputError, OutputDir, read_results

from conftest import DATA, write_wav

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def rows_by_id(out: Path) -> dict[str, dict]:
    table = read_results(str(out))
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows"
    return {r["id"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def minute_files(tmp_path_factory, speech_clips):
    """Four one-minute files of real speech (two windows each), different orders so texts differ."""
    root = tmp_path_factory.mktemp("minutes")
    paths = []
    for seed in range(4):
        audio, _ = ev.build_long_speech(speech_clips, 55, seed=seed)
        paths.append(write_wav(root / f"m{seed}.wav", audio))
    return paths


def write_manifest(path: Path, audio: list[Path | str]) -> Path:
    path.write_text("id,audio\n" + "".join(f"f{i},{a}\n" for i, a in enumerate(audio)))
    return path


def transcriber_pids() -> set[int]:
    import psutil

    pids = set()
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if "ModelStage" in text:
            pids.add(p.info["pid"])
    return pids


def test_killed_model_actor_is_replaced_and_no_row_is_lost(tmp_path, minute_files, ray_session, bundled_model):
    import psutil

    manifest = write_manifest(tmp_path / "m.csv", minute_files)
    out = tmp_path / "out"
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = ray_whisper.transcribe(str(manifest), str(out), batch_size=2, files_per_task=1)
        except BaseException as e:  # surfaced by the assertion below
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        for pid in transcriber_pids():
            try:
                busy = psutil.Process(pid).cpu_times().user
            except psutil.NoSuchProcess:
                continue
            if busy > 6.0:  # model loaded and decoding batches
                os.kill(pid, signal.SIGKILL)
                killed = pid
                break
        time.sleep(0.2)
    thread.join(timeout=600)
    assert killed is not None, "never saw a busy model actor to kill"
    assert "error" not in result, result.get("error")
    rows = rows_by_id(out)
    assert sorted(rows) == [f"f{i}" for i in range(len(minute_files))]
    assert all(r["status"] == "ok" and r["num_chunks"] >= 2 for r in rows.values()), rows
    assert (out / SUCCESS).exists()


@pytest.fixture(scope="module")
def ten_files(tmp_path_factory, speech_clips):
    """Ten files of 22-27 s of real speech, one chunk each."""
    root = tmp_path_factory.mktemp("ten")
    return [write_wav(root / f"s{seed}.wav", ev.build_long_speech(speech_clips[:1], 12, seed=seed)[0]) for seed in range(10)]


def start_cli(manifest: Path, out: Path, env: dict, *extra: str) -> subprocess.Popen:
    """The CLI in a process group of its own, its progress (a line per part written) on stderr."""
    return subprocess.Popen(
        [sys.executable, "-m", "ray_whisper.cli", "transcribe", str(manifest), str(out), "--batch-size", "2",
         "--files-per-task", "1", *extra],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_WHISPER_PROGRESS_INTERVAL_S": "0", **env}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def closed_port_for_ray() -> int:
    """A port on 127.0.0.1 that nobody listens on (a RAY_ADDRESS whose cluster is gone)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for_progress(proc: subprocess.Popen, at_least: int) -> tuple[int, list[str]]:
    """Read the CLI's stderr until a progress line reports `at_least` files done; (files done, lines read)."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        found = re.search(r"files done: (\d+)/", line)
        if found and int(found.group(1)) >= at_least:
            return int(found.group(1)), lines
    raise AssertionError(f"the run ended (rc {proc.wait()}) before {at_least} files were done:\n{''.join(lines)[-3000:]}")


def test_a_driver_killed_at_70_percent_keeps_what_reached_storage_and_the_rerun_does_only_the_rest(
        tmp_path, ten_files, ray_session):
    """SIGKILL of the driver once a progress line says 7 of 10 files are done (an observed signal, not a
    sleep): every file reported done is in OUTPUT_DIR, the same command redoes only the others, and the
    table ends with exactly one row per id. What the killed run left half-written (our temporary file) is
    removed; a foreign file named like a part is left alone and never read."""
    manifest = write_manifest(tmp_path / "m.csv", ten_files)
    out = tmp_path / "out"
    proc = start_cli(manifest, out, {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    done_at_kill, _ = wait_for_progress(proc, 7)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 7 <= done_at_kill < 10, "killed after the run had finished: the test proves nothing"
    assert not (out / SUCCESS).exists()
    with pytest.raises(IncompleteOutputError):
        read_results(str(out))
    kept = OutputDir.open(str(out)).scan()
    assert kept.num_rows >= done_at_kill  # every file the progress line counted had reached storage
    (out / ".rw-tmp-part-19990101T000000-dead00-0000.parquet").write_bytes(b"PAR1 half a file")
    (out / "part-from-someone-else.parquet").write_bytes(b"not ours")

    summary = ray_whisper.transcribe(str(manifest), str(out), batch_size=2, files_per_task=1)
    assert summary.skipped == kept.num_rows
    assert len(ten_files) - summary.skipped <= len(ten_files) - done_at_kill  # only the files not yet finished
    rows = rows_by_id(out)
    assert sorted(rows) == [f"f{i}" for i in range(10)]
    assert all(r["status"] == "ok" for r in rows.values())
    assert summary.files_ok == 10 and summary.files_failed == 0
    assert not (out / ".rw-tmp-part-19990101T000000-dead00-0000.parquet").exists()
    assert (out / "part-from-someone-else.parquet").read_bytes() == b"not ours"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_exits_130_saying_what_was_kept_and_how_to_resume(tmp_path, ten_files, ray_session, sig):
    """SIGTERM (Kubernetes stopping the job's pod) takes Ctrl-C's path: no Ray signal dump, no exit 15."""
    manifest = write_manifest(tmp_path / "m.csv", ten_files)
    out = tmp_path / "out"
    # batches of 1: a part every 4 files, so the first progress line comes while files are still left (with
    # batches of 2 its first part could hold all ten once decoding got faster, and the signal came too late)
    proc = start_cli(manifest, out, {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}, "--batch-size", "1")
    done, _ = wait_for_progress(proc, 1)
    assert done < 10, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "Traceback" not in rest and len(rest.strip().splitlines()) <= 3, rest
    saved = int(re.search(r"interrupted: at least (\d+) of this run's 10 file\(s\) are saved in ", rest).group(1))
    assert saved >= done and "rerun the same command" in rest
    assert OutputDir.open(str(out)).scan().num_rows >= saved  # parts in flight when it stopped may land too
    assert not (out / SUCCESS).exists()


def _running(p) -> bool:
    """A process that has not exited yet: one that exits (or lingers as a zombie) between the listing and the
    look at its command line is already gone, not one that must go."""
    import psutil

    try:
        p.cmdline()
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return False
    return True


def test_a_local_ray_goes_away_with_a_killed_driver(tmp_path, ten_files):
    """Without RAY_ADDRESS the CLI starts its own Ray; SIGKILL of the driver must not leave Ray's processes
    (its agents used to linger for a minute or more, listening)."""
    import psutil

    manifest = write_manifest(tmp_path / "m.csv", ten_files[:2])
    proc = start_cli(manifest, tmp_path / "out", {"RAY_ADDRESS": ""})
    wait_for_progress(proc, 1)
    family = [p for p in psutil.Process(proc.pid).children(recursive=True) if _running(p)
              and "ray_whisper.batch.cluster" not in " ".join(p.cmdline())]
    assert len(family) >= 4, family  # gcs, raylet, agents, workers
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as the OOM killer or `kill -9 <pid>` would
    proc.wait()
    try:
        gone, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        for p in family:
            if p.is_running():
                p.kill()


def test_exit_status_partial_success_and_retry_errors(tmp_path, ray_session, capsys):
    later = tmp_path / "later.flac"
    manifest = write_manifest(tmp_path / "m.csv", [DATA / "jfk.flac", later])
    out = tmp_path / "out"

    assert cli.main(["transcribe", str(manifest), str(out)]) == 1
    err = capsys.readouterr()
    assert "files ok: 1   failed: 1" in err.out and "fetch_error=1" in err.out and "--retry-errors" in err.err
    rows = rows_by_id(out)
    assert rows["f1"]["status"] == "error" and rows["f1"]["error"].startswith("fetch_error: not found")

    assert cli.main(["transcribe", str(manifest), str(out), "--allow-partial"]) == 0  # nothing to redo
    assert "resumed: 2 file(s)" in capsys.readouterr().out

    shutil.copy(DATA / "jfk.flac", later)
    assert cli.main(["transcribe", str(manifest), str(out)]) == 1  # errors are not retried unasked
    assert cli.main(["transcribe", str(manifest), str(out), "--retry-errors"]) == 0
    rows = rows_by_id(out)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows.values())
    assert rows["f0"]["text"] == rows["f1"]["text"]


def test_bad_option_fails_on_the_driver_before_any_worker(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.csv", [DATA / "jfk.flac"])
    started = time.monotonic()
    assert cli.main(["transcribe", str(manifest), str(tmp_path / "out"), "--language", "xx"]) == 2
    assert time.monotonic() - started < 5
    assert "unknown language 'xx'" in capsys.readouterr().err  # no language at all, whatever the model
    assert cli.main(["transcribe", str(manifest), str(tmp_path / "out"), "--language", "de"]) == 2
    assert "needs a multilingual model" in capsys.readouterr().err  # the default model is English-only
    out = tmp_path / "out"  # may exist (checked writable first), but holds no result
    assert not out.exists() or not any(out.glob("part-*")) and not (out / SUCCESS).exists()


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (root, as CI runs here; skipped where mounting is not allowed)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_stops_the_run_with_one_line_and_a_rerun_completes(tmp_path, ten_files, ray_session):
    """Writing a part fails with ENOSPC: the run stops (exit 2) with one line saying what happened, what was
    kept and what to do, no traceback and no rows relabelled `lost`; with room again, the same command
    finishes the rest."""
    manifest = write_manifest(tmp_path / "m.csv", ten_files)
    with small_disk(tmp_path / "disk", "12k") as out:
        proc = start_cli(manifest, out, {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 2, err
        assert "Traceback" not in err and "lost:" not in err and "came back from no worker" not in err, err
        last = err.strip().splitlines()[-1]
        assert re.match(r"ray-whisper: error: writing to .* failed: OSError: \[Errno 28\] No space left on device", last), last
        kept = OutputDir.open(str(out)).scan()
        assert re.search(rf"The {kept.num_rows} file\(s\) finished before are saved; free space", last), last
        assert 0 < kept.num_rows < 10 and not (out / SUCCESS).exists()
        assert not [p for p in out.iterdir() if p.name.startswith(".rw-tmp-")]  # the failed part left nothing

        subprocess.run(["mount", "-o", "remount,size=10m", str(out)], check=True)
        summary = ray_whisper.transcribe(str(manifest), str(out), batch_size=2, files_per_task=1)
        assert summary.skipped == kept.num_rows and summary.files_ok == 10
        rows = rows_by_id(out)
        assert sorted(rows) == [f"f{i}" for i in range(10)] and all(r["status"] == "ok" for r in rows.values())
