"""What Serve's HTTP proxy answers by itself, in OpenAI's error shape: a replica that died mid-request, Serve's
own queue full, a request timeout. The proxy writes those as plain text ("Internal Server Error" for a killed
replica), which SDKs cannot parse; this middleware, loaded by the proxy through Serve's
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (`ray-whisper serve` sets it before it starts Ray), rewrites them.
For a replica lost mid-request the proxy sends nothing (the HTTP server would then say a plain 500): that
becomes a 503 with Retry-After: the request did not fail, it was not finished, and
clients (the `openai` SDK included) retry a 503. Responses of the app itself (JSON) pass untouched.

The same middleware answers the probes (GET /health, GET /ready) from the replicas' reports (health.py), and
refuses a new transcription at once, before its body is read or Serve routes it, while every live replica
reports that it would refuse it (at capacity or draining), counting what it let through since those reports:
the replica itself stays the judge of the rest.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from starlette.middleware import Middleware

from . import health

CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
IMPORT_PATH = "ray_whisper.serve.proxy:middlewares"
FRESH_S = 0.1  # the replicas' reports are read again after this long (at most one read at a time)
WORK = ("/v1/audio/transcriptions", "/v1/audio/translations")


def middlewares() -> list[Middleware]:
    """The proxy callback: Serve calls it in each proxy and wraps its HTTP app in these."""
    return [Middleware(OpenAIErrors)]


class OpenAIErrors:
    """ASGI middleware: a plain-text error response (4xx or 5xx) becomes OpenAI's JSON; a 500 becomes a 503."""

    def __init__(self, app: Any):
        self.app = app
        self.refused = 0  # new requests this proxy refused itself, added to /health's total
        self._reports: list[dict] = []
        self._read_at = 0.0
        self._reading: asyncio.Future | None = None
        self._passed: list[list] = []  # the transcriptions let through lately (health.refusal's ledger)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if await self._answered_here(scope, send):
            return
        if scope.get("method") == "POST" and scope.get("path") in WORK:
            now = time.time()
            self._passed = [p for p in self._passed if p[2] is None or now - p[2] < health.STALE_S]
            passed = [now, False, None]  # when let through, body read, when answered (health.refusal)
            self._passed.append(passed)

            async def receive(inner: Any = receive) -> dict:
                message = await inner()
                if message["type"] != "http.request" or not message.get("more_body"):
                    passed[1] = True  # the body read (or the client gone): no longer an upload
                return message

            try:
                await self._forward(scope, receive, send)
            finally:
                passed[2] = time.time()
        else:
            await self._forward(scope, receive, send)

    async def _forward(self, scope: dict, receive: Any, send: Any) -> None:
        """To Serve, its plain-text errors rewritten."""
        start: dict | None = None
        body = b""
        sent = False

        async def rewrite(message: dict) -> None:
            nonlocal start, body, sent
            if message["type"] == "http.response.start":
                sent = True
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"text/plain"):
                    start = message  # held until its body is known
                    return
            elif message["type"] == "http.response.body" and start is not None:
                body += message.get("body", b"")
                if message.get("more_body"):
                    return
                for out in openai_error(start, body.decode(errors="replace"), request_id(scope)):
                    await send(out)
                return
            await send(message)

        await self.app(scope, receive, rewrite)
        if not sent:  # Serve's proxy sends nothing when the replica died: the server would say a plain 500
            rid = request_id(scope)
            for out in openai_error({"status": 500, "headers": [(b"x-request-id", rid.encode())] if rid else []},
                                    "the replica was lost", rid):
                await send(out)


    async def _answered_here(self, scope: dict, send: Any) -> bool:
        """The probes, and a refusal that every live replica would give; False: the request goes on to Serve."""
        path, method = scope.get("path", ""), scope.get("method", "")
        if not ((method == "GET" and path in ("/health", "/ready")) or (method == "POST" and path in WORK)):
            return False
        try:
            reports, now = await self._replica_reports(), time.time()
        except Exception:  # noqa: BLE001 - Ray's store unreachable: Serve and the replicas answer as before
            return False
        rid = request_id(scope) or f"req_{uuid.uuid4().hex[:20]}"
        if path == "/health":
            status, body = health.health(reports, now, self.refused)
            await _send_json(send, status, body, rid)
        elif path == "/ready":
            status, body, retry = health.ready(reports, now)
            if status != 200:
                body = _error_body(body["reason"], rid)
            await _send_json(send, status, body, rid, retry)
        else:
            refusal = health.refusal(reports, now, [tuple(p) for p in self._passed])
            if refusal is None:
                return False
            self.refused += 1
            reason, retry = refusal
            await _send_json(send, 503, _error_body(reason + "; retry after the Retry-After header's seconds", rid),
                             rid, retry)
        return True

    async def _replica_reports(self) -> list[dict]:
        """The replicas' reports, read at most every FRESH_S, one read at a time, off the proxy's event loop."""
        if time.monotonic() - self._read_at < FRESH_S:
            return self._reports
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(asyncio.to_thread(health.read_reports))
        reports = await asyncio.shield(self._reading)
        self._reports, self._read_at = reports, time.monotonic()
        return reports


def _error_body(message: str, rid: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None, "request_id": rid}}


async def _send_json(send: Any, status: int, body: dict, rid: str, retry_after_s: float | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"x-request-id", rid.encode())]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(max(1, -(-int(retry_after_s * 1000) // 1000))).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def request_id(scope: dict) -> str | None:
    """The id Serve's RequestIdMiddleware (inside this one) put in the request's headers."""
    return next((v.decode() for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"), None)


def openai_error(start: dict, text: str, rid: str | None) -> list[dict]:
    """The ASGI messages of the proxy's plain-text error `start` + `text`, as OpenAI's JSON error."""
    status = 503 if start["status"] == 500 else start["status"]
    kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    if status == 503 and not any(k.lower() == b"retry-after" for k, _ in kept):
        kept.append((b"retry-after", b"1"))
    message = text.strip() or "error"
    if start["status"] == 500:
        message = ("the replica serving this request stopped before it answered; send the request again "
                   f"(Serve: {message[:200]})")
    kind = "invalid_request_error" if status < 500 else "server_error"
    payload = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None,
                                    "request_id": rid}}).encode()
    headers = kept + [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": payload, "more_body": False}]
