"""The endpoint's admission, queue deadline, drain cut-off and replica sizing rule, without Ray or a model:
plain asyncio and pure functions, in milliseconds."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from ray_whisper.config import ServeOptions
from ray_whisper.errors import ConfigError
from ray_whisper.serve.admission import Gate, default_held
from ray_whisper.serve.app import replica_warning
from ray_whisper.serve.protocol import ApiError, RequestId
from ray_whisper.serve.queue import BatchQueue, Expired


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
    (2, 0.0, [2.0], 0, True),  # the measured case: 2 replicas on 2 cores, 0.51x of one
    (1, 0.0, [2.0], 0, False),
    (2, 0.0, [8.0], 0, False),
    (3, 0.0, [8.0], 0, True),
    (4, 0.0, [8.0, 8.0], 0, False),
    (3, 1.0, [8.0], 2, True),
    (4, 0.5, [8.0], 2, False),
])
def test_more_replicas_than_the_host_can_use_warn(replicas, gpus, nodes, cluster_gpus, warns):
    message = replica_warning(replicas, gpus, nodes, cluster_gpus)
    assert (message is not None) == warns
    if message:
        assert f"--min-replicas {replicas}" in message and "Use --min-replicas" in message


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
