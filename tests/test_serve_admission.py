"""The endpoint's admission, queue deadline, drain cut-off and replica sizing rule, without Ray or a model:
plain asyncio and pure functions, in milliseconds."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_whisper.config import ServeOptions
from ray_whisper.errors import ConfigError
from ray_whisper.serve import health
from ray_whisper.serve.admission import Gate, default_held
from ray_whisper.serve.app import replica_warning
from ray_whisper.serve.protocol import ApiError, RequestId
from ray_whisper.serve.queue import BatchQueue, Expired

ROOT = Path(__file__).resolve().parents[1]


def test_a_full_gate_refuses_with_503_retry_after_and_the_reason():
    async def run():
        gate = Gate(max_held=1, max_uploads=1, retry_after=lambda: 2.4)
        async with gate.upload():
            with pytest.raises(ApiError) as uploads:  # a second upload while one is read
                async with gate.upload():
                    pass
        async with gate.hold():
            with pytest.raises(ApiError) as held:
                async with gate.upload():
                    pass
            assert gate.unready().startswith("at capacity")
        assert gate.unready() is None and (gate.held, gate.reading, gate.refused) == (0, 0, 2)
        return uploads.value, held.value

    uploads, held = asyncio.run(run())
    assert "--max-uploads 1" in uploads.message and "--max-queued-requests 1" in held.message
    reply = held.response(RequestId("r1", echo=True))
    assert reply.status_code == 503 and reply.headers["retry-after"] == "3" and reply.headers["x-request-id"] == "r1"
    assert json.loads(reply.body)["error"]["type"] == "server_error"


def test_a_drain_refuses_new_requests_and_cuts_what_is_left_at_its_deadline_with_503():
    async def run():
        gate = Gate(max_held=4, max_uploads=4, retry_after=lambda: 1.0)

        async def slow():
            await asyncio.sleep(30)
            return "done"

        async def quick():
            await asyncio.sleep(0.05)
            return "done"

        cut = asyncio.ensure_future(gate.until_cutoff(slow()))
        finished = asyncio.ensure_future(gate.until_cutoff(quick()))
        gate.drain(time.time() + 0.2)
        with pytest.raises(ApiError) as refused:
            gate.check()
        await asyncio.sleep(0.3)
        gate.drain(time.time() - 0.1)  # the watch, polling past the deadline
        with pytest.raises(ApiError) as late:
            await asyncio.wait_for(cut, 5)
        return refused.value, late.value, await finished

    refused, late, finished = asyncio.run(run())
    assert refused.status == 503 and refused.message.startswith("draining")
    assert late.status == 503 and "drain deadline" in late.message and finished == "done"


def test_a_chunk_that_waited_past_the_queue_deadline_is_refused_before_it_is_decoded():
    decoded: list[list[int]] = []

    async def run_batch(items: list[int]) -> list[int]:
        decoded.append(items)
        await asyncio.sleep(0.3)  # the model busy: the next items wait
        return items

    async def run():
        queue = BatchQueue(run_batch, max_batch_size=1, wait_s=0.0, max_wait_s=0.1)
        return await asyncio.gather(*(queue.submit(i) for i in range(3)), return_exceptions=True)

    results = asyncio.run(run())
    assert results[0] == 0 and all(isinstance(r, Expired) for r in results[1:]) and decoded == [[0]]


def test_the_default_queue_bound_is_a_batch_and_a_half():
    assert default_held(16) == 24 and default_held(1) == 1


@pytest.mark.parametrize("replicas, gpus, nodes, cluster_gpus, warns", [
    (2, 0.0, [2.0], 0, True),  # the measured case: 2 replicas on 2 cores, 0.51-0.84x of one
    (1, 0.0, [2.0], 0, False),
    (2, 0.0, [8.0], 0, True),  # one CPU replica per node
    (2, 0.0, [8.0, 8.0], 0, False),
    (3, 0.0, [8.0, 8.0, 0.0], 0, True),  # a node without CPUs takes none
    (3, 1.0, [8.0], 2, True),
    (4, 0.5, [8.0], 2, False),
])
def test_more_replicas_than_the_host_can_use_warn(replicas, gpus, nodes, cluster_gpus, warns):
    message = replica_warning(replicas, gpus, nodes, cluster_gpus)
    assert (message is not None) == warns
    if message:
        assert f"--min-replicas {replicas}" in message and "Use --min-replicas" in message
        if gpus == 0:  # the rule the warning applies, with the measurement behind it
            assert "one replica per node" in message and "docs/performance.md" in message


@pytest.mark.parametrize("bad", [{"max_queued_requests": 0}, {"upload_timeout_s": 0}, {"drain_timeout_s": -1},
                                 {"max_uploads": 0}, {"queue_timeout_s": 0}])
def test_admission_options_are_checked_at_construction(bad):
    with pytest.raises(ConfigError, match=next(iter(bad)).replace("_", "-")):
        ServeOptions(**bad)


def through_proxy_middleware(messages: list[dict]) -> list[dict]:
    """What a client gets when the proxy's own app sends `messages` (an empty list: nothing, a lost replica)."""
    from ray_whisper.serve.proxy import OpenAIErrors

    async def inner(scope, receive, send):
        for m in messages:
            await send(m)

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [(b"x-request-id", b"abc")]}
    asyncio.run(OpenAIErrors(inner)(scope, None, send))
    return sent


@pytest.mark.parametrize("case", ["lost replica", "serve's queue full", "the app's own json"])
def test_the_proxys_plain_text_errors_become_openais_json(case):
    start = {"type": "http.response.start", "status": 503,
             "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"7")]}
    body = {"type": "http.response.body", "body": b"Request dropped due to backpressure", "more_body": False}
    if case == "lost replica":
        sent = through_proxy_middleware([])
    elif case == "serve's queue full":
        sent = through_proxy_middleware([start, body])
    else:
        start["headers"], body["body"] = [(b"content-type", b"application/json")], b'{"text": "hi"}'
        assert through_proxy_middleware([start, body]) == [start, body]
        return
    headers = dict(sent[0]["headers"])
    error = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 503 and headers[b"content-type"] == b"application/json"
    assert error["type"] == "server_error" and error["request_id"] == "abc"
    assert headers[b"retry-after"] == (b"1" if case == "lost replica" else b"7")
    assert ("stopped before it answered" if case == "lost replica" else "backpressure") in error["message"]


def report(replica: str, age_s: float, unready: str | None = None, **figures) -> dict:
    return {"replica": replica, "pid": 1, "model": "m", "time": 1000.0 - age_s, "unready": unready,
            "retry_after_s": 2.5, "batches": 2, "chunks": 5, **figures}


@pytest.mark.parametrize("case, ready_code, health_code, reason", [
    ("starting", 503, 503, "no model replica is up yet"),
    ("killed", 503, 503, "last one reported 9 s ago"),
    ("at capacity", 503, 200, "at capacity: 24 requests"),
    ("one of two takes work", 200, 200, None),
])
def test_the_probes_answer_from_the_replicas_reports(case, ready_code, health_code, reason):
    reports = {"starting": [], "killed": [report("a", 9.0)],
               "at capacity": [report("a", 0.2, "at capacity: 24 requests"), report("b", 9.0)],
               "one of two takes work": [report("a", 0.2, "at capacity: 24 requests"), report("b", 0.1)]}[case]
    status, body, retry = health.ready(reports, 1000.0)
    assert status == ready_code and (reason is None or reason in body["reason"]), body
    assert (retry is None) == (status == 200) and (case != "at capacity" or retry == 2.5)
    status, body = health.health(reports, 1000.0, refused_here=3)
    assert status == health_code and (status == 503) == (body["status"] == "unavailable")
    if status == 200:  # only the live replicas count, each named, plus what the proxy refused
        assert [r["replica"] for r in body["replicas"]] == (["a"] if case == "at capacity" else ["a", "b"])
        assert body["batches"] == 2 * len(body["replicas"]) and body["refused"] == 3
    refusal = health.refusal(reports, 1000.0)  # the proxy refuses at once only when every live replica would
    assert (refusal is not None) == (case == "at capacity")


def test_the_proxy_answers_the_probes_and_refuses_without_reaching_serve():
    from ray_whisper.serve.proxy import OpenAIErrors

    async def serve_app(scope, receive, send):  # Serve's own app: must not be reached
        raise AssertionError(scope["path"])

    async def run(proxy, method, path):
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        await proxy({"type": "http", "method": method, "path": path, "headers": []}, None, send)
        return sent[0]["status"], dict(sent[0]["headers"]), json.loads(sent[1]["body"])

    async def all_three():
        proxy = OpenAIErrors(serve_app)
        proxy._reports, proxy._read_at = [report("a", 0.0, "draining: the server is shutting down")], time.monotonic()
        for r in proxy._reports:
            r["time"] = time.time()
        return [await run(proxy, m, p) for m, p in [("GET", "/ready"), ("GET", "/health"),
                                                    ("POST", "/v1/audio/transcriptions")]] + [proxy.refused]

    ready, live, refused, count = asyncio.run(all_three())
    assert ready[0] == 503 and ready[1][b"retry-after"] == b"3" and ready[2]["error"]["message"].startswith("draining")
    assert live[0] == 200 and live[2]["replicas"][0]["replica"] == "a" and b"x-request-id" in live[1]
    assert refused[0] == 503 and refused[2]["error"]["type"] == "server_error" and count == 1


def test_the_proxy_counts_what_it_let_through_since_the_replicas_last_reported():
    """A replica reports every 0.25 s; a burst in between must not all go on to a replica that is already full
    (to be refused there, behind its decoding). The proxy adds the requests it let through after a report,
    spread over the live replicas: a body read against the replica's held requests, an upload still being read
    against its uploads, as the replica counts them (a slow upload must not make normal requests refused)."""
    one = [report("a", 0.1, held_requests=3, uploads=1, max_held=6, max_uploads=4)]
    after, before = 999.95, 999.8  # let through after the report (not in it) and before it (in it)
    held, uploading = (after, True, None), (after, False, None)
    assert health.refusal(one, 1000.0, [held] * 2) is None
    reason, retry = health.refusal(one, 1000.0, [held] * 3)
    assert "--max-queued-requests 6" in reason and retry == 2.5
    assert health.refusal(one, 1000.0, [(before, True, None)] * 9) is None  # in the report already
    assert "--max-uploads 4" in health.refusal(one, 1000.0, [uploading] * 3)[0]
    assert health.refusal(one, 1000.0, [uploading] * 2 + [held] * 2) is None  # slow uploads are not held requests
    answered_since = (before, True, 999.99)  # in the report, gone now
    assert health.refusal(one, 1000.0, [held] * 3 + [answered_since]) is None
    assert health.refusal(one, 1000.0, [held] * 3 + [(before, True, 999.85)]) is not None  # gone before the report
    full = [report("a", 0.1, "at capacity: 6 requests", held_requests=6, uploads=0, max_held=6, max_uploads=4)]
    assert health.refusal(full, 1000.0) is not None and health.refusal(full, 1000.0, [answered_since]) is None
    two = one + [report("b", 0.1, held_requests=0, uploads=0, max_held=6, max_uploads=40)]
    assert health.refusal(two, 1000.0, [held] * 11) is None and health.refusal(two, 1000.0, [held] * 12) is not None
    assert health.refusal([report("a", 0.1, held_requests=5)], 1000.0, [held] * 50) is None  # no limits reported
    draining = [dict(one[0], draining=True, unready="draining: the server is shutting down")]
    assert health.refusal(draining, 1000.0, [answered_since] * 5)[0].startswith("draining")

    from ray_whisper.serve.proxy import OpenAIErrors

    release = None

    async def serve_app(scope, receive, send):  # Serve's app: reads the body as a replica does, then holds it
        while (await receive()).get("more_body"):
            pass
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    async def post(proxy, trickling=False):
        sent: list[dict] = []
        stop = asyncio.Event()

        async def receive():
            if trickling:  # a slowloris: never done
                await asyncio.sleep(0.01)
                return {"type": "http.request", "body": b"a", "more_body": True}
            return {"type": "http.request", "body": b"audio", "more_body": False}

        async def send(message):
            sent.append(message)
            stop.set()

        task = asyncio.ensure_future(proxy({"type": "http", "method": "POST", "path": "/v1/audio/transcriptions",
                                            "headers": []}, receive, send))
        await asyncio.wait([task, asyncio.ensure_future(stop.wait())], timeout=0.2,
                           return_when=asyncio.FIRST_COMPLETED)
        return sent[0]["status"] if sent else "passed", task

    async def burst():
        nonlocal release
        release = asyncio.Event()
        proxy = OpenAIErrors(serve_app)
        proxy._reports = [dict(one[0], held_requests=0, uploads=0, max_held=3, max_uploads=3, time=time.time())]
        proxy._read_at = time.monotonic() + 60  # the report stays the one read
        slow = [await post(proxy, trickling=True) for _ in range(2)]
        normal = [await post(proxy) for _ in range(4)]
        statuses = [s for s, _ in slow + normal]
        release.set()
        for _, task in normal:
            await task
        for _, task in slow:
            task.cancel()
        return statuses, proxy.refused, (await post(proxy))[0]

    statuses, refused, later = asyncio.run(burst())
    # two slow uploads pass (2 < 3 uploads); three normal ones pass (held 0, 1, 2 < 3), the fourth is refused;
    # a third slow upload would have been refused (3 uploads), but a normal request is not
    assert statuses == ["passed"] * 5 + [503] and refused == 1 and later == 200, statuses


def test_the_proxy_callback_loads_without_the_models_dependencies():
    """Serve's proxy imports it on nodes that may have Ray Serve only (deploy/kuberay installs it --no-deps)."""
    code = ("import sys\nfor m in ('torch', 'numpy', 'fastapi', 'ray_whisper.serve.app', 'ray_whisper.asr'):\n"
            "    sys.modules[m] = None\nimport ray_whisper.serve.proxy as p\nprint(len(p.middlewares()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr[-2000:]


def test_the_rayservice_loads_the_proxy_callback_on_every_node():
    """Without RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH on the nodes a plain `serve run` (a RayService) gives
    plain-text errors and probes queued behind audio; with it but without the package, no proxy starts."""
    import yaml

    from ray_whisper.serve.proxy import CALLBACK, IMPORT_PATH

    doc = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    package = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["runtime_env"]["pip"]["packages"][0]
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get(CALLBACK) == IMPORT_PATH, container["name"]
        assert container["command"] == [f"pip install --no-deps '{package}'"], container["name"]
