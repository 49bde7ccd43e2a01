"""The endpoint under load and faults, on 127.0.0.1 with the real model, bounded: more clients than a replica
holds get fast 503s with Retry-After in OpenAI's shape (and the `openai` client's retries then succeed), health
answers while audio decodes, slow uploads time out without blocking others, and `ray-whisper serve` drains on
SIGTERM: the requests in flight are answered, new ones get 503, the process exits 0."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import requests

from ray_whisper.asr import evaluation as ev

from conftest import DATA, REFS, write_wav
from test_serve import ROOT, free_port, health

pytestmark = pytest.mark.slow
JFK = DATA / "jfk.flac"
HELD, UPLOADS, UPLOAD_TIMEOUT_S = 2, 8, 10.0


@pytest.fixture(scope="module")
def server(bundled_model, tmp_path_factory):
    """`ray-whisper serve` as an operator runs it (its own local Ray, the proxy's probes and refusals), small."""
    flags = ["--max-batch-size", "2", "--batch-wait-timeout-s", "0.1", "--max-queued-requests", str(HELD),
             "--max-uploads", str(UPLOADS), "--upload-timeout-s", str(UPLOAD_TIMEOUT_S)]
    with endpoint(tmp_path_factory.mktemp("load"), *flags) as (_, url, _):
        yield url


def post(url: str, timeout: float = 300) -> tuple[int, float, requests.Response]:
    started = time.monotonic()
    reply = requests.post(f"{url}/v1/audio/transcriptions", files={"file": ("jfk.flac", JFK.read_bytes())},
                          data={"model": "whisper-1"}, timeout=timeout)
    return reply.status_code, time.monotonic() - started, reply


def timed_get(url: str) -> tuple[int, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, time.monotonic() - started
    except urllib.error.HTTPError as e:
        return e.code, time.monotonic() - started


def test_overload_is_refused_fast_with_retry_after_and_health_answers_meanwhile(server):
    post(server)  # warm
    results: list[tuple[int, float, requests.Response]] = []
    probes: list[tuple[str, int, float]] = []
    clients = [threading.Thread(target=lambda: results.append(post(server))) for _ in range(10)]
    for t in clients:
        t.start()
    while any(t.is_alive() for t in clients) and len(probes) < 200:
        for route in ("/health", "/ready", "/-/healthz"):
            probes.append((route, *timed_get(server + route)))
        time.sleep(0.05)
    for t in clients:
        t.join(300)
    refused = [(s, e, r) for s, e, r in results if s == 503]
    answered = [(s, e, r) for s, e, r in results if s == 200]
    assert len(results) == 10 and len(refused) + len(answered) == 10, [s for s, _, _ in results]
    assert refused and len(answered) >= HELD
    for _, elapsed, reply in refused:
        assert reply.headers["content-type"] == "application/json", (reply.headers, reply.text)
        error = reply.json()["error"]
        assert elapsed < 2.0 and int(reply.headers["retry-after"]) >= 1  # 1 s, with room for this shared VM
        assert error["type"] == "server_error" and error["message"].startswith("at capacity")
    print("refusals (s):", sorted(round(e, 3) for _, e, _ in refused))
    assert sorted(e for _, e, _ in refused)[len(refused) // 2] < 1.0  # the median refusal
    assert all(ev.wer([REFS["jfk.flac"]["text"]], [r.json()["text"]]) <= 0.05 for _, _, r in answered)
    for route in ("/health", "/ready", "/-/healthz"):
        answered = sorted(e for r, s, e in probes if r == route and s in ((200, 503) if route == "/ready" else (200,)))
        assert len(answered) == len([p for p in probes if p[0] == route]), probes  # never failed, never hung
        p50, p95 = answered[len(answered) // 2], answered[int(0.95 * (len(answered) - 1))]
        print(route, "p50 %.3f p95 %.3f max %.3f" % (p50, p95, answered[-1]))
        # all three answered by Serve's proxy, none behind audio: typically 1-5 ms; the bound on the slowest leaves
        # room for a machine shared with other work (p95 0.23 s at a load average of 90 on 2 cores)
        assert p50 < 0.1 and answered[-1] < 1.0, (route, answered[-5:])


def test_the_openai_clients_retries_get_through_an_overloaded_replica(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=10, timeout=300)
    before = health(server)["refused"]
    texts: list[str] = []

    def one() -> None:
        texts.append(client.audio.transcriptions.create(model="whisper-1", file=JFK.open("rb")).text)

    clients = [threading.Thread(target=one) for _ in range(6)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(600)
    assert len(texts) == 6 and all(ev.wer([REFS["jfk.flac"]["text"]], [t]) <= 0.05 for t in texts)
    assert health(server)["refused"] > before  # some were refused first, and came back after Retry-After


def trickle(port: int, seconds: float, replies: list) -> None:
    """A client sending its body one byte a second (what a slowloris does), then reading what it got."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                  b"Content-Type: multipart/form-data; boundary=b0\r\n\r\n"
                  b'--b0\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n')
        s.settimeout(1.0)
        started, data = time.monotonic(), b""
        while time.monotonic() - started < seconds and not data:
            try:
                s.sendall(b"a")
                data = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - started
        with contextlib.suppress(OSError):
            while more := s.recv(65536):  # the rest of the answer, to the connection's end
                data += more
        replies.append((data.split(b" ", 2)[1] if data else b"", elapsed, data))


def test_slow_uploads_time_out_and_do_not_block_a_normal_request(server):
    port = int(server.rsplit(":", 1)[1])
    answered: list[float] = []  # the best of 3 answered: other work on this VM only adds (a refusal, while the
    deadline = time.monotonic() + 120  # replica's report still says the last test's load, is no latency)
    while len(answered) < 3 and time.monotonic() < deadline:
        status, elapsed, _ = post(server)
        answered.append(elapsed) if status == 200 else time.sleep(0.5)
    unloaded = min(answered)
    replies: list = []
    slow = [threading.Thread(target=trickle, args=(port, 30, replies)) for _ in range(UPLOADS - 1)]
    for t in slow:
        t.start()
    time.sleep(1.0)
    normal = [post(server) for _ in range(3)]
    assert [s for s, _, _ in normal] == [200] * 3 and min(e for _, e, _ in normal) < 2 * unloaded, (normal, unloaded)
    for t in slow:
        t.join(60)
    assert [c for c, _, _ in replies] == [b"408"] * (UPLOADS - 1), [(c, round(e, 1)) for c, e, _ in replies]
    assert all(UPLOAD_TIMEOUT_S - 1 < e < UPLOAD_TIMEOUT_S + 3 and b'"error"' in d for _, e, d in replies)
    deadline = time.monotonic() + 5  # the figures are the replica's report, at most a fraction of a second old
    while health(server)["uploads"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health(server)["uploads"] == 0


def test_uploads_past_the_cap_are_refused_at_once(server):
    port = int(server.rsplit(":", 1)[1])
    replies: list = []
    slow = [threading.Thread(target=trickle, args=(port, 30, replies)) for _ in range(UPLOADS + 3)]
    for t in slow:
        t.start()
    for t in slow:
        t.join(60)
    refused = [(e, d) for c, e, d in replies if c == b"503"]
    assert len(refused) == 3 and [c for c, _, _ in replies].count(b"408") == UPLOADS, [c for c, _, _ in replies]
    assert all(e < 2.0 and b"retry-after" in d.lower() and b"--max-uploads" in d for e, d in refused)


@contextlib.contextmanager
def endpoint(tmp_path, *flags: str):
    """`ray-whisper serve` in a process of its own, with its own local Ray: its URL and log, once it serves."""
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"  # a file, not a pipe: Ray's forwarded logs must never block the process
    proc = subprocess.Popen([sys.executable, "-m", "ray_whisper.cli", "serve", "--port", str(port), *flags], env=env,
                            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "serving " not in log.read_text():  # serve.run has returned: the SIGTERM handler is in place
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the endpoint did not come up"
            time.sleep(1)
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def long_requests(url: str, path, n: int) -> tuple[list, list[threading.Thread]]:
    """n requests of the audio at `path` sent at once, answered once each is held by the replica."""
    results: list = []

    def one() -> None:
        results.append(requests.post(f"{url}/v1/audio/transcriptions", files={"file": ("long.wav", path.read_bytes())},
                                     data={"model": "whisper-1"}, timeout=300))

    clients = [threading.Thread(target=one) for _ in range(n)]
    for t in clients:
        t.start()
    while health(url)["held_requests"] < n:
        time.sleep(0.2)
    return results, clients


def test_ray_whisper_serve_drains_on_sigterm(speech_clips, tmp_path):
    """Requests of 60 s audio in flight, SIGTERM: each one answered in full, a new one refused with 503, exit 0."""
    audio, reference = ev.build_long_speech(speech_clips, 60, seed=7)
    path = write_wav(tmp_path / "long.wav", audio)
    with endpoint(tmp_path, "--drain-timeout-s", "120") as (proc, url, log):
        results, clients = long_requests(url, path, 3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        status, _, refused = post(url, timeout=30)
        assert status == 503, log.read_text()[-3000:]
        assert refused.json()["error"]["message"].startswith("draining") and refused.headers["retry-after"]
        for t in clients:
            t.join(300)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert [r.status_code for r in results] == [200] * 3, ([r.text for r in results], log.read_text()[-3000:])
        assert all(ev.wer([reference], [r.json()["text"]]) <= 0.15 for r in results)
        assert "Traceback" not in log.read_text()


def test_a_replica_killed_mid_request_answers_json_503_and_the_clients_retry_succeeds(speech_clips, tmp_path):
    """Serve's proxy would send a plain-text 500; proxy.OpenAIErrors makes it OpenAI's JSON, 503, Retry-After."""
    from openai import OpenAI

    audio, _ = ev.build_long_speech(speech_clips, 60, seed=8)
    path = write_wav(tmp_path / "long.wav", audio)
    with endpoint(tmp_path) as (proc, url, log):
        pid = health(url)["replicas"][0]["pid"]  # the replica's process, of this endpoint's own Ray
        results, clients = long_requests(url, path, 2)
        os.kill(pid, signal.SIGKILL)
        for t in clients:
            t.join(120)
        assert [r.status_code for r in results] == [503] * 2, [r.text for r in results]
        for r in results:
            assert r.headers["retry-after"] and r.headers["content-type"] == "application/json"
            assert "stopped before it answered" in r.json()["error"]["message"]
            assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
        # while no replica is up, the probes say so at once (the proxy answers them, not Serve's router)
        probe_until(url, lambda answers: answers["/ready"][0] == 503 and answers["/health"][0] == 503)
        for route in ("/ready", "/health"):
            dead = sorted(probe(url, route) for _ in range(5))
            assert all(s == 503 and "no model replica is up" in b for s, _, b in dead), (route, dead)
            times = sorted(e for _, e, _ in dead)
            assert times[2] < 0.1 and times[-1] < 1.0, (route, times)  # the median, and none near hanging
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)  # its default retries
        text = client.audio.transcriptions.create(model="whisper-1", file=JFK.open("rb")).text
        assert ev.wer([REFS["jfk.flac"]["text"]], [text]) <= 0.05
        assert probe_until(url, lambda answers: answers["/ready"][0] == 200)["/health"][0] == 200
        assert health(url)["replicas"][0]["pid"] != pid


def probe(url: str, route: str) -> tuple[int, float, str]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url + route, timeout=10) as r:
            return r.status, time.monotonic() - started, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, time.monotonic() - started, e.read().decode()


def probe_until(url: str, done, limit_s: float = 60) -> dict[str, tuple[int, float, str]]:
    """/ready and /health probed every 0.2 s until `done` holds for their answers (bounded)."""
    deadline = time.monotonic() + limit_s
    while True:
        answers = {route: probe(url, route) for route in ("/ready", "/health")}
        if done(answers):
            return answers
        assert time.monotonic() < deadline, answers
        time.sleep(0.2)


def test_sigterm_while_the_model_loads_stops_what_was_started(tmp_path):
    """Before serve.run returns, /ready says 503 (starting) at once; SIGTERM then takes Ctrl-C's path: Serve
    and the local Ray stopped, one line saying so, exit 0, no traceback (Ray's own handler would kill it)."""
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "ray_whisper.cli", "serve", "--port", str(port)], env=env,
                            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # Serve's proxy is up (serve.start) while the replica still loads the model
            assert proc.poll() is None and "serving " not in log.read_text(), log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the proxy did not come up"
            with contextlib.suppress(OSError):
                status, elapsed, body = probe(url, "/ready")
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        output = log.read_text()
        assert status == 503 and elapsed < 1.0 and "no model replica is up yet" in body, (status, elapsed, body)
        assert "serving " not in output and "the endpoint stopped during its start-up" in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        with pytest.raises(OSError):  # nothing listens any more
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
