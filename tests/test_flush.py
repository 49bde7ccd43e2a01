"""Bounded loss in time: the driver writes finished files as a part at least every --flush-interval-s (not only
every few model batches), at the end of the stream, and before it says how many are saved when it is stopped;
the progress line counts the rows on storage. First the policy and the driver's loop without Ray (error rows,
which need no model), then real runs whose audio comes from a local HTTP server that holds each file until
the test lets it through, so that how far a run has got is set by the test, not by the machine's speed."""

from __future__ import annotations

import http.server
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import ray_whisper
from ray_whisper import schema
from ray_whisper.batch.assemble import Assembler
from ray_whisper.batch.pipeline import _collect
from ray_whisper.config import StorageOptions
from ray_whisper.errors import Interrupted, OutputError
from ray_whisper.io.output import SUCCESS, OutputDir, read_results
from ray_whisper.io.parts import PartWriter

from conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
JFK = (DATA / "jfk.flac").read_bytes()  # 11 s of real speech, one chunk


def token_rows(ids: list[str], is_last: bool = True) -> dict[str, np.ndarray]:
    """Token rows of one-chunk files that failed to decode: what the model stage passes on for them (their
    output rows need no model)."""
    def column(value):
        out = np.empty(len(ids), dtype=object)
        for i in range(len(ids)):
            out[i] = value(ids[i]) if callable(value) else value
        return out

    return {
        schema.ID: column(lambda i: i), schema.AUDIO: column(lambda i: f"/audio/{i}.wav"), schema.LANGUAGE: column(None),
        schema.CHUNK_INDEX: np.zeros(len(ids), np.int64), schema.IS_LAST: np.full(len(ids), is_last),
        schema.START: np.zeros(len(ids), np.int64), schema.END: np.full(len(ids), 16_000, np.int64),
        schema.STRIDE_LEFT: np.zeros(len(ids), np.int64), schema.STRIDE_RIGHT: np.zeros(len(ids), np.int64),
        schema.ERROR: column("decode_error: not audio"), schema.WARNING: column(None),
        schema.SEG_START: column(lambda i: []), schema.SEG_END: column(lambda i: []),
        schema.SEG_TOKENS: column(lambda i: []), schema.LANGUAGE_PROB: column(None), schema.SEG_WORDS: column(lambda i: []),
    }


def stored(out: Path) -> int:
    return OutputDir.open(str(out)).scan().num_rows


def test_a_part_is_due_by_time_or_by_count_and_only_with_finished_files(tmp_path):
    now = [0.0]
    writer = PartWriter(str(tmp_path), StorageOptions(), "r1")
    assembler = Assembler(None, "m", "fp", writer, flush_interval_s=30, flush_chunks=4, clock=lambda: now[0])
    assert not assembler.due() and assembler.wait_s() == 30

    now[0] = 100.0
    assembler.add(token_rows(["a", "b"]))  # the run's first files: early on, a part is due after 1 s
    assert not assembler.due() and assembler.wait_s() == pytest.approx(1.0)
    now[0] = 101.0
    assert assembler.due()
    receipts = assembler.flush()
    assert receipts[schema.ID].to_pylist() == ["a", "b"] and receipts[schema.WRITE_ERROR].to_pylist() == [None, None]
    assert stored(tmp_path) == 2 and not assembler.due()

    assembler.add(token_rows(["c", "d", "e", "f"]))  # 4 token rows since the last part: due at once
    assert assembler.due() and assembler.flush().num_rows == 4

    now[0] = 150.0  # 50 s after the first file: the interval has grown to a tenth of that
    assert assembler.flush().num_rows == 0  # (nothing finished: no part, the clock starts again)
    assembler.add(token_rows(["g"]))
    assert assembler.interval_s() == pytest.approx(5.0) and not assembler.due()
    now[0] = 155.0  # 5 s since the last part, but the interval grew meanwhile: 5.5 s
    assert not assembler.due()
    now[0] = 157.0
    assert assembler.due() and assembler.flush().num_rows == 1

    now[0] = 1000.0  # long into the run: --flush-interval-s caps it
    assert assembler.interval_s() == 30
    assembler.add(token_rows(["h"], is_last=False))  # a file still waiting for chunks: nothing to write
    assert not assembler.due() and assembler.flush().num_rows == 0 and stored(tmp_path) == 7


def test_a_run_killed_at_70_percent_keeps_half_its_files_by_the_flush_rule_alone():
    """The rule, on a clock: files finishing evenly from the first at t0 to the end at T, each given to the
    Assembler as it finishes; a kill at 0.7 T keeps those the last part before it wrote. At least half, for runs
    of 2 to 600 minutes whose first file comes after up to a quarter of the run (start-up), by default."""
    for minutes in (2, 5, 30, 600):
        for startup in (0.05, 0.25):
            total = minutes * 60.0
            t0, kill, files = startup * total, 0.7 * total, 400
            now = [0.0]
            assembler = Assembler(None, "m", "fp", None, flush_interval_s=30, flush_chunks=10**9, clock=lambda: now[0])
            written = 0
            for k in range(files):
                now[0] = t0 + k * (total - t0) / (files - 1)
                if now[0] > kill:
                    break
                assembler.add(token_rows([f"f{k}"]))
                if assembler.due():  # flush() without a store: what it writes, and when
                    written += len(assembler.finished)
                    assembler.finished, assembler.chunks, assembler.last_part = [], 0, now[0]
            assert written >= files / 2, (minutes, startup, written)


class Rows:
    """Token rows as the model stage's Dataset gives them to the driver: `batches`, each after `pause_s` (a
    model batch that takes that long); `check` runs before each later batch."""

    def __init__(self, batches: list[dict], pause_s: float = 0.0, check=None):
        self.batches, self.pause_s, self.check = batches, pause_s, check

    def iter_batches(self, batch_size=None, batch_format="numpy", prefetch_batches=1):
        for i, batch in enumerate(self.batches):
            if i:
                time.sleep(self.pause_s)
                if self.check:
                    self.check(i)
            yield batch


def test_the_driver_writes_on_time_while_the_next_model_batch_is_slow(tmp_path):
    """Finished files reach storage within the flush interval even while no new rows come (a model batch of
    minutes on a CPU): the driver does not wait for the next batch to write the last one's files."""
    seen = []
    assembler = Assembler(None, "m", "fp", PartWriter(str(tmp_path), StorageOptions(), "r1"), flush_interval_s=0.3)
    rows = Rows([token_rows(["a", "b"]), token_rows(["c"])], pause_s=5.0, check=lambda i: seen.append(stored(tmp_path)))
    receipts = _collect(rows, assembler, 3, 0, str(tmp_path))
    assert seen == [2]  # both files of the first batch were on storage before the second batch came
    assert sorted(receipts[schema.ID].to_pylist()) == ["a", "b", "c"] and stored(tmp_path) == 3  # and the tail


def test_an_interrupt_writes_what_is_finished_before_saying_how_many_are_saved(tmp_path):
    """Ctrl-C (SIGTERM takes the same path) while files are finished but no part is due yet: they are written,
    then the line counts them."""
    assembler = Assembler(None, "m", "fp", PartWriter(str(tmp_path), StorageOptions(), "r1"), flush_interval_s=3600)

    def interrupt(i: int) -> None:
        while not assembler.finished:  # the driver has taken the first batch in
            time.sleep(0.01)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # as Ctrl-C reaches the driver
        time.sleep(5)

    rows = Rows([token_rows(["a", "b", "c"]), token_rows(["d"])], check=interrupt)
    # Ctrl-C as a driver in a terminal has it: a suite started as a background job of a non-interactive shell
    # (`pytest &` in a script) inherits SIGINT ignored, and Python keeps it so
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Interrupted, match=r"^interrupted: at least 3 of this run's 5 file\(s\) are saved in .* \(and 7 from"):
            _collect(rows, assembler, 5, 7, str(tmp_path))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stored(tmp_path) == 3


def test_a_part_the_store_refuses_stops_the_run_saying_what_is_saved(tmp_path):
    (tmp_path / "a-file").write_text("")
    output = str(tmp_path / "a-file" / "out")
    assembler = Assembler(None, "m", "fp", PartWriter(output, StorageOptions(), "r1"), flush_interval_s=3600)
    with pytest.raises(OutputError, match=r"^writing to .*/out failed: \w+Error: .*The 0 file\(s\) finished before are "
                                          r"saved; free space \(or fix the permissions\) and rerun the same command"):
        _collect(Rows([token_rows(["a"])]), assembler, 1, 0, output)


# ------------------------------------------------------------------ real runs (Ray, the model, real speech)


class Gate:
    """Files served over HTTP on 127.0.0.1, each request held until the test releases that file."""

    def __init__(self, names: list[str]):
        self.released = {name: threading.Event() for name in names}
        self.requests: list[str] = []  # "f1.flac GET at 7.2 s", for the message of a test that stalls
        started = time.monotonic()
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, body: bool) -> None:
                gate.requests.append(f"{self.path.lstrip('/')} {self.command} at {time.monotonic() - started:.1f} s")
                if not gate.released[self.path.lstrip("/")].wait(900):
                    return
                start, end = 0, len(JFK) - 1
                if "Range" in self.headers:
                    first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
                    start, end = int(first), min(int(last) if last else end, end)
                self.send_response(206 if "Range" in self.headers else 200)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(JFK)}")
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    self.wfile.write(JFK[start:end + 1])

            def do_HEAD(self) -> None:
                self._answer(False)

            def do_GET(self) -> None:
                self._answer(True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    def release(self, *names: str) -> None:
        for name in names:
            self.released[name].set()

    def manifest(self, path: Path) -> Path:
        port = self.server.server_address[1]
        path.write_text("id,audio\n" + "".join(f"{n.split('.')[0]},http://127.0.0.1:{port}/{n}\n" for n in self.released))
        return path


def stalled(gate: Gate, result: dict) -> str:
    """What a gated run that stopped moving was doing: the gate's requests, the run's outcome so far, and what
    holds the shared Ray's CPUs."""
    import ray
    from ray._private.state import state

    actors = [(a["ActorClassName"], a["State"]) for a in state.actor_table(None).values() if a["State"] != "DEAD"]
    return (f"requests: {gate.requests}; run: {result}; free: {ray.available_resources().get('CPU')} of "
            f"{ray.cluster_resources().get('CPU')} CPU; live actors: {actors}")


@contextmanager
def gate_of(n: int):
    gate = Gate([f"f{i}.flac" for i in range(n)])
    thread = threading.Thread(target=gate.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield gate
    finally:
        gate.release(*gate.released)
        gate.server.shutdown()
        gate.server.server_close()


class Lines:
    """A process's stderr, line by line, with a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.read, self.lines = proc, [], queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in proc.stderr] + [self.lines.put(None)], daemon=True).start()

    def next(self, deadline: float, state=lambda: "") -> str:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            raise AssertionError(f"no more progress (rc {self.proc.poll()}; {state()}):\n{''.join(self.read)[-3000:]}")
        self.read.append(line)
        return line

    def rest(self) -> str:
        self.proc.wait(timeout=120)
        out = []
        while (line := self.lines.get(timeout=10)) is not None:
            out.append(line)
        return "".join(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_driver_stopped_at_70_percent_keeps_at_least_half_the_files(tmp_path, ray_session, sig):
    """16 files, of which 11 (70%) can finish and 5 are still being fetched; batches of 3 (a part every 4
    batches would be every 12 files, more than the run can finish). With --flush-interval-s 2 each progress
    line counts the rows on storage, at least 8 get there, the driver is stopped, they stay, and the same
    command does only the rest."""
    out = tmp_path / "out"
    with gate_of(16) as gate:
        names = list(gate.released)
        gate.release(*names[:11])
        manifest = gate.manifest(tmp_path / "m.csv")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray_whisper.cli", "transcribe", str(manifest), str(out), "--batch-size", "3",
             "--files-per-task", "1", "--flush-interval-s", "2", "--fetch-timeout-s", "900"],
            env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_WHISPER_PROGRESS_INTERVAL_S": "0",
                 "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address},
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        lines, done, deadline = Lines(proc), 0, time.monotonic() + 300
        try:
            while done < 8:
                found = re.search(r"files done: (\d+)/16", lines.next(deadline, lambda: stalled(gate, {"done": done})))
                if found:
                    done = int(found.group(1))
                    assert stored(out) >= done  # the line counts what is on storage, as it is printed (a part may land since)
            assert proc.poll() is None and done < 16 and not (out / SUCCESS).exists()
            if sig == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            else:
                proc.send_signal(sig)
                rest = lines.rest()
                assert proc.returncode == 130, rest
                saved = int(re.search(r"interrupted: at least (\d+) of this run's 16 file\(s\) are saved in ", rest).group(1))
                assert saved == stored(out), rest
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        kept = stored(out)
        assert kept >= 8 and not (out / SUCCESS).exists()

        gate.release(*names)
        summary = ray_whisper.transcribe(str(manifest), str(out), batch_size=3, files_per_task=1)
    assert summary.skipped == kept and summary.files_ok == 16 and summary.files_failed == 0
    table = read_results(str(out))
    assert sorted(table["id"].to_pylist()) == sorted(f"f{i}" for i in range(16))
    assert set(table["status"].to_pylist()) == {"ok"}


@pytest.mark.slow
def test_with_a_short_flush_interval_each_file_reaches_storage_while_the_run_goes(tmp_path, ray_session):
    """Batches of 1 and --flush-interval-s 2: each file is let through only once the one before it is on
    storage, so the run can only end if every part is written while it goes (a part every 4 batches could
    not be), and the end writes the last."""
    out = tmp_path / "out"
    result: dict = {}
    with gate_of(4) as gate:
        manifest = gate.manifest(tmp_path / "m.csv")

        def run() -> None:
            try:
                result["summary"] = ray_whisper.transcribe(str(manifest), str(out), batch_size=1, files_per_task=1,
                                                           flush_interval_s=2, fetch_timeout_s=900)
            except BaseException as e:  # surfaced below
                result["error"] = e

        thread = threading.Thread(target=run)
        thread.start()
        try:
            for k, name in enumerate(gate.released):
                gate.release(name)
                wait_s = 300 if k == 0 else 120  # the first waits for the model to load as well
                deadline = time.monotonic() + wait_s
                while stored(out) <= k and thread.is_alive() and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert stored(out) == k + 1, f"file {k + 1} of 4 not on storage after {wait_s} s: {stalled(gate, result)}"
                assert k == 3 or not (out / SUCCESS).exists()
        finally:
            gate.release(*gate.released)
            thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    assert result["summary"].files_ok == 4
    assert len(list(out.glob("part-*.parquet"))) == 4  # one per file, each written as it finished
