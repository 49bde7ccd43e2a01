"""Who a replica lets in, and how it stops: bounded uploads and queue, refusals with Retry-After, and the drain.

A refusal must be fast and the server's own (OpenAI's JSON, 503, Retry-After), so admission is counted here, in
the replica, rather than left to Serve's queue in front of it (whose refusal is plain text): Serve gives each
replica slots enough for every request admitted here plus the refused and the health probes (app.build).

The drain reaches every replica through Ray's key-value store: `ray-whisper serve`, on SIGTERM or Ctrl-C,
writes the deadline (`request_drain`); each replica reads it every DRAIN_POLL_S, refuses new requests from
then on, answers what is left at the deadline with a 503, and reports how many requests it still holds, which
`wait_drained` watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from . import health
from .protocol import ApiError

log = logging.getLogger(__name__)
DRAIN_POLL_S = 0.25
NAMESPACE = "ray_whisper"
T = TypeVar("T")


def default_held(batch_size: int) -> int:
    """--max-queued-requests by default: a batch decoding and half the next one gathering. Under 100 clients
    (tiny.en, 2 cores; benchmarks/serve.py --overload 100) 2 batches held gave a p95 of 2.2-2.6 batch times,
    1 batch 1.4 batch times but 15% less goodput (refused clients idle while the model has room), 1.5: 1.8."""
    return batch_size + batch_size // 2


class Gate:
    """A replica's admission. `reading`: uploads still being received (at most max_uploads); `held`: requests
    past their upload, waiting for or in a batch (at most max_held). `retry_after` estimates, in seconds,
    when a refused client should come back (a batch's time)."""

    def __init__(self, max_held: int, max_uploads: int, retry_after: Callable[[], float]):
        self.max_held, self.max_uploads, self.retry_after = max_held, max_uploads, retry_after
        self.held = self.reading = self.refused = 0
        self.deadline: float | None = None  # wall clock (time.time()) at which a drain cuts what is left
        self._cutoff: asyncio.Event | None = None

    def unready(self) -> str | None:
        """Why a new request would be refused now; None when it would be taken."""
        if self.deadline is not None:
            return "draining: the server is shutting down; send new requests to another instance"
        if self.held >= self.max_held:
            return f"at capacity: {self.held} requests queued or decoding (--max-queued-requests {self.max_held})"
        if self.reading >= self.max_uploads:
            return f"at capacity: {self.reading} uploads being read (--max-uploads {self.max_uploads})"
        return None

    def _refuse(self, reason: str) -> ApiError:
        self.refused += 1
        return ApiError(503, reason + "; retry after the Retry-After header's seconds", None, "server_error",
                        retry_after_s=self.retry_after())

    def check(self) -> None:
        reason = self.unready()
        if reason:
            raise self._refuse(reason)

    @contextlib.asynccontextmanager
    async def upload(self) -> AsyncIterator[None]:
        self.check()
        self.reading += 1
        try:
            yield
        finally:
            self.reading -= 1

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        reason = self.unready() if self.held >= self.max_held or self.deadline is not None else None
        if reason:  # the queue filled up (or a drain began) while this upload was read
            raise self._refuse(reason)
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1

    async def until_cutoff(self, work: Awaitable[T]) -> T:
        """`work`'s result, unless a drain's deadline passes first: then a 503 (the client retries elsewhere)."""
        if self._cutoff is None:
            self._cutoff = asyncio.Event()
        task = asyncio.ensure_future(work)
        cut = asyncio.ensure_future(self._cutoff.wait())
        try:
            await asyncio.wait({task, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
        if not task.done():
            task.cancel()
            raise ApiError(503, "the server shut down before this request finished (drain deadline passed); "
                           "send it again", None, "server_error", retry_after_s=1)
        return task.result()

    def drain(self, deadline: float) -> None:
        if self.deadline is None:
            log.info("draining: new requests refused; %d held, %d uploading; deadline in %.0f s", self.held,
                     self.reading, deadline - time.time())
        self.deadline = deadline
        if time.time() >= deadline:
            if self._cutoff is None:
                self._cutoff = asyncio.Event()
            self._cutoff.set()


def _key(app: str) -> str:
    return f"drain:{app}"


async def watch_drain(gate: Gate, app: str, replica: str) -> None:
    """A replica's side of the drain, forever: the deadline read, the requests it still holds reported."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    while True:
        try:
            value = await asyncio.to_thread(_internal_kv_get, _key(app), namespace=NAMESPACE)
            if value:
                gate.drain(float(value))
                await asyncio.to_thread(_internal_kv_put, f"{_key(app)}:held:{replica}",
                                        str(gate.held + gate.reading), namespace=NAMESPACE)
        except Exception:  # noqa: BLE001 - the store unreachable for a moment: the next poll tries again
            log.debug("drain poll failed", exc_info=True)
        await asyncio.sleep(DRAIN_POLL_S)


def request_drain(app: str, timeout_s: float) -> float:
    """Ask every replica of `app` to drain within timeout_s; the deadline (wall clock)."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    _internal_kv_del(f"{_key(app)}:held:", del_by_prefix=True, namespace=NAMESPACE)
    deadline = time.time() + timeout_s
    _internal_kv_put(_key(app), str(deadline), namespace=NAMESPACE)
    return deadline


def wait_drained(app: str, deadline: float, grace_s: float = 2.0) -> bool:
    """Until every replica that reported holds nothing (True), or the deadline and grace_s pass (False: what
    was left has been answered 503 by then). A replica that never reported never had a request: it starts
    its watch on its first one."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    settle = time.monotonic() + 4 * DRAIN_POLL_S  # every watching replica has read the deadline and reported
    while time.time() < deadline + grace_s:
        keys = _internal_kv_list(f"{_key(app)}:held:", namespace=NAMESPACE)
        held = [int(_internal_kv_get(k, namespace=NAMESPACE) or 0) for k in keys]
        if not any(held) and time.monotonic() > settle:
            return True
        time.sleep(DRAIN_POLL_S)
    return False


def drain(app: str, timeout_s: float) -> bool:
    """`ray-whisper serve` stopping: new requests refused, those in flight given up to timeout_s; True when
    they all finished. A second Ctrl-C stops the wait."""
    try:
        return wait_drained(app, request_drain(app, timeout_s))
    except KeyboardInterrupt:
        return False


def clear_drain(app: str) -> None:
    """Forget a drain of `app`, and its earlier replicas' health reports: an endpoint of the same name starting
    again must neither refuse nor report replicas that are gone."""
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(_key(app), del_by_prefix=True, namespace=NAMESPACE)
    health.forget(app)

