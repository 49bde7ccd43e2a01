"""Remote fetches that fail the way networks do, against real servers on 127.0.0.1: one that accepts and never
answers, a port nobody listens on, one that stops sending half-way through a file, and one that fails twice
and then answers. Each becomes its file's row quickly (a timeout, `unreachable`, or the audio after a retry),
and the other files of the same decode task go on."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from contextlib import contextmanager

import pyarrow as pa
import pytest

from ray_whisper import schema
from ray_whisper.asr.chunking import ChunkGeometry
from ray_whisper.config import StorageOptions
from ray_whisper.batch.cpu_stage import chunk_batch

from conftest import DATA

JFK = (DATA / "jfk.flac").read_bytes()
TIMEOUT_S = 1.0


@contextmanager
def black_hole():
    """A server that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves jfk.flac with Range support; `stall` stops sending after 64 KB of every GET; `flaky` answers the
    first two connections' requests by closing the connection; `statuses` answers the first requests with
    these HTTP statuses (then serves the file); a path starting with /loop redirects to itself."""

    stall = False
    flaky = 0
    statuses: list[int] = []
    requests = 0
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # quiet
        pass

    def _fail_first(self) -> bool:
        with Handler.lock:
            Handler.requests += 1
            if Handler.flaky > 0:
                Handler.flaky -= 1
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return True
            status = Handler.statuses.pop(0) if Handler.statuses else None
        if self.path.startswith("/loop"):
            self.send_response(302)
            self.send_header("Location", self.path)
        elif status is not None:
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "1")
        else:
            return False
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def do_HEAD(self) -> None:
        if self._fail_first():
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(JFK)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        if self._fail_first():
            return
        start, end = 0, len(JFK) - 1
        if "Range" in self.headers:
            first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) if last else end, end)
        body = JFK[start : end + 1]
        self.send_response(206 if "Range" in self.headers else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(JFK)}")
        self.end_headers()
        if self.stall:  # the first 64 KB, then nothing more
            self.wfile.write(body[: 64 * 1024])
            self.wfile.flush()
            time.sleep(30)
            return
        self.wfile.write(body)


@contextmanager
def file_server(stall: bool = False, flaky: int = 0, statuses: tuple[int, ...] = ()):
    Handler.stall, Handler.flaky, Handler.statuses, Handler.requests = stall, flaky, list(statuses), 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def decode_task(urls: list[str], budget_s: float = 60) -> dict[str, list[dict]]:
    """One decode task over these URLs, as a worker runs it; rows by file id. A task still running after
    `budget_s` is a hang, and fails the test rather than stalling the suite."""
    manifest = pa.table({schema.ID: [f"f{i}" for i in range(len(urls))], schema.AUDIO: urls,
                         schema.LANGUAGE: [None] * len(urls)})
    rows: dict[str, list[dict]] = {}

    def run() -> None:
        for block in chunk_batch(manifest, ChunkGeometry(), 80, StorageOptions(fetch_timeout_s=TIMEOUT_S)):
            for row in block.to_pylist():
                rows.setdefault(row[schema.ID], []).append(row)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(budget_s)
    assert not worker.is_alive(), f"the decode task hung for {budget_s} s"
    return rows


def test_a_server_that_never_answers_times_out_and_the_task_goes_on():
    with black_hole() as hole, file_server() as good:
        started = time.monotonic()
        rows = decode_task([f"{hole}/a.wav", f"{good}/jfk.flac"])
        elapsed = time.monotonic() - started
    (silent,) = rows["f0"]
    assert silent[schema.ERROR].startswith("fetch_error: timed out: http://127.0.0.1:"), silent[schema.ERROR]
    assert rows["f1"][0][schema.ERROR] is None and rows["f1"][-1][schema.END] == 176_000  # jfk: 11 s decoded
    # 3 attempts of at most ~2 timeouts (connect, read) each, 1 s + 2 s of backoff: bounded, not a hang
    assert elapsed < 3 * 2 * TIMEOUT_S + 3 + 5, elapsed


def test_nobody_listening_is_unreachable_not_not_found():
    rows = decode_task([f"http://127.0.0.1:{closed_port()}/a.wav"])
    assert rows["f0"][0][schema.ERROR].startswith("fetch_error: unreachable: http://127.0.0.1:")


def test_a_file_whose_bytes_stop_coming_half_way_is_a_fetch_error_not_a_truncated_file():
    with file_server(stall=True) as server:
        started = time.monotonic()
        rows = decode_task([f"{server}/jfk.flac"])
        elapsed = time.monotonic() - started
    errors = [r[schema.ERROR] for r in rows["f0"] if r[schema.ERROR]]
    assert errors and errors[0].startswith("fetch_error: timed out"), rows["f0"]
    assert not any(r[schema.WARNING] for r in rows["f0"])
    assert elapsed < 20, elapsed


def test_a_connection_that_fails_twice_is_tried_again_and_the_file_decodes():
    with file_server(flaky=2) as server:
        rows = decode_task([f"{server}/jfk.flac"])
    assert all(r[schema.ERROR] is None for r in rows["f0"]), rows["f0"][0][schema.ERROR]
    assert rows["f0"][-1][schema.END] == 176_000


@pytest.mark.parametrize("timeout", [0, -1, 4000])
def test_fetch_timeout_must_be_sensible(timeout):
    from ray_whisper.errors import ConfigError

    with pytest.raises(ConfigError, match="--fetch-timeout-s"):
        StorageOptions(fetch_timeout_s=timeout)


def test_a_signed_url_is_fetched_with_its_signature_and_stored_without_it():
    with file_server() as server:
        secret = "0123456789abcdef" * 4
        url = f"{server}/jfk.flac?X-Amz-Credential=AKIAEXAMPLE%2F20261201&X-Amz-Signature={secret}".replace(
            "http://", "http://reader:pa55word@")
        rows = decode_task([url])
    assert rows["f0"][0][schema.ERROR] is None  # fetched: the real URL was used
    stored = rows["f0"][0][schema.AUDIO]
    assert secret not in stored and "pa55word" not in stored and "AKIAEXAMPLE" not in stored
    assert stored.endswith("/jfk.flac?X-Amz-Credential=***&X-Amz-Signature=***") and "reader:***@" in stored


@pytest.mark.parametrize("status", [503, 500, 429])
def test_a_server_error_twice_then_the_file_is_tried_again_and_decodes(status):
    """5xx and 429 say "not now", not "not there": fetched again after the backoff (fsspec asks with HEAD,
    then GET, so two answers are one attempt)."""
    with file_server(statuses=(status,) * 2) as server:
        rows = decode_task([f"{server}/jfk.flac"])
        assert Handler.requests > 2  # the file was asked for again after the errors
    assert all(r[schema.ERROR] is None for r in rows["f0"]), rows["f0"][0][schema.ERROR]
    assert rows["f0"][-1][schema.END] == 176_000


def test_a_server_that_keeps_failing_is_a_server_error_not_not_found():
    with file_server(statuses=(503,) * 100) as server:
        started = time.monotonic()
        rows = decode_task([f"{server}/jfk.flac"])
        elapsed = time.monotonic() - started
    (row,) = rows["f0"]
    assert row[schema.ERROR] == f"fetch_error: server error 503: {server}/jfk.flac", row[schema.ERROR]
    assert 3 <= elapsed < 20, elapsed  # tried 3 times, 1 s and 2 s apart


def test_a_redirect_loop_says_so():
    with file_server() as server:
        rows = decode_task([f"{server}/loop/jfk.flac"])
    (row,) = rows["f0"]
    assert row[schema.ERROR].startswith("fetch_error: redirect loop (too many redirects): http://"), row[schema.ERROR]


def test_every_query_value_but_the_harmless_ones_is_hidden_in_rows_and_messages():
    """Tokens come under any name (access_token, api_key, code, ...): only parameters known to be harmless
    keep their values, in the stored `audio` column and in error messages alike."""
    query = "access_token=tok-SECRET-1&api_key=key-SECRET-2&format=flac&versionId=7&SECRETflag"
    with file_server() as server:
        rows = decode_task([f"{server}/jfk.flac?{query}"])
    with file_server(statuses=(503,) * 100) as server:
        failed = decode_task([f"{server}/jfk.flac?{query}"])
    stored, error = rows["f0"][0][schema.AUDIO], failed["f0"][0][schema.ERROR]
    assert rows["f0"][0][schema.ERROR] is None  # fetched with the real query
    assert stored.endswith("/jfk.flac?access_token=***&api_key=***&format=flac&versionId=7&***"), stored
    assert "SECRET" not in stored and "SECRET" not in error, error
    assert error.endswith("/jfk.flac?access_token=***&api_key=***&format=flac&versionId=7&***"), error


def test_ids_stay_apart_and_survive_re_signing():
    """A default id hashes storage.stable_uri: a re-signed URL keeps its id; URLs that differ in another
    parameter keep different ids although both are stored as ?file=***."""
    from ray_whisper.io.storage import public_uri, stable_uri

    a, b = "https://h/get?file=a.mp3&sig=1", "https://h/get?file=b.mp3&sig=1"
    assert public_uri(a) == public_uri(b) == "https://h/get?file=***&sig=***"
    assert stable_uri(a) != stable_uri(b)
    assert stable_uri(a) == stable_uri(a.replace("sig=1", "sig=2"))
