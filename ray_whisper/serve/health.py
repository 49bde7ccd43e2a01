"""What the probes answer, from outside the model's queue: each replica publishes a report of itself (its
figures and whether it takes work) to Ray's key-value store every REPORT_S, and Serve's proxy (proxy.py) answers
GET /health and GET /ready from those reports without routing anything to a replica. So both answer while
every replica is busy decoding, dead, or still loading its model, and say why.

    /health  200 {"status": "ok", totals, "replicas": [each live replica's report]}; 503 while none reports
    /ready   200 while some live replica takes new requests; 503 + Retry-After with the reason otherwise

A replica is live while its last report is under STALE_S old. Its counters are its own since it started
(`replica`, `pid`, `up_s` say which); the totals add up the live replicas, plus what the proxy refused itself.
Imports nothing heavy: the proxy loads this module on nodes that may have neither torch nor the model.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

NAMESPACE = "ray_whisper"
REPORT_S = 0.25  # how often a replica publishes its report
STALE_S = 3.0  # a replica silent this long is gone (killed, restarting) or not up yet
PREFIX = "health:"
log = logging.getLogger(__name__)
SUMMED = ("batches", "chunks", "refused", "held_requests", "uploads", "queued_chunks")


def key(app: str, replica: str) -> str:
    return f"{PREFIX}{app}:{replica}"


def publish(app: str, replica: str, report: dict[str, Any]) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key(app, replica), json.dumps({**report, "time": time.time()}), namespace=NAMESPACE)


def forget(app: str) -> None:
    """The reports of an app's earlier replicas gone (a new deployment of the same name starts clean)."""
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(f"{PREFIX}{app}:", del_by_prefix=True, namespace=NAMESPACE)


def read_reports() -> list[dict[str, Any]]:
    """Every replica's last report, of every app (blocking: a few calls to Ray's GCS)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    out = []
    for k in _internal_kv_list(PREFIX, namespace=NAMESPACE):
        value = _internal_kv_get(k, namespace=NAMESPACE)
        if value:
            out.append(json.loads(value))
    return out


def live(reports: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    return sorted((r for r in reports if now - r.get("time", 0) < STALE_S), key=lambda r: r.get("replica", ""))


def no_replica(reports: list[dict[str, Any]], now: float) -> str:
    """Why no replica can take work when none is live."""
    if not reports:
        return "no model replica is up yet (starting: the model is loading), or none was ever deployed"
    last = max(r.get("time", 0) for r in reports)
    return (f"no model replica is up: the last one reported {now - last:.0f} s ago (lost or restarting; "
            "Serve starts a new one)")


def health(reports: list[dict[str, Any]], now: float, refused_here: int = 0) -> tuple[int, dict[str, Any]]:
    """GET /health: the status code and body."""
    alive = live(reports, now)
    if not alive:
        return 503, {"status": "unavailable", "reason": no_replica(reports, now), "replicas": []}
    body: dict[str, Any] = {"status": "ok", "model": alive[0].get("model"), "replicas": alive}
    body.update({name: sum(int(r.get(name, 0)) for r in alive) for name in SUMMED})
    body["refused"] += refused_here
    body["recent_batch_sizes"] = [s for r in alive for s in r.get("recent_batch_sizes", [])]
    body["mean_batch_size"] = round(body["chunks"] / body["batches"], 2) if body["batches"] else 0.0
    body["draining"] = any(r.get("draining") for r in alive)
    return 200, body


def ready(reports: list[dict[str, Any]], now: float) -> tuple[int, dict[str, Any], float | None]:
    """GET /ready: the status code, body and Retry-After (None when ready)."""
    alive = live(reports, now)
    if not alive:
        return 503, {"status": "unavailable", "reason": no_replica(reports, now)}, 1.0
    taking = [r for r in alive if not r.get("unready")]
    if taking:
        return 200, {"status": "ready", "replicas": len(alive), "taking_requests": len(taking)}, None
    reasons = sorted({r["unready"] for r in alive})
    return 503, {"status": "unavailable", "reason": "; ".join(reasons)}, min(r.get("retry_after_s", 1.0) for r in alive)


def refusal(reports: list[dict[str, Any]], now: float,
            passed: Sequence[tuple[float, bool, float | None]] = ()) -> tuple[str, float] | None:
    """Why a new request would be refused by every live replica (its reason and Retry-After), or None when
    one would take it or none is live (then Serve's router waits for one: a replica restarting comes back).

    `passed`: the proxy's ledger of the requests it let through lately, each (when, whether its body has been
    read, when it was answered or None). A report is up to REPORT_S old: what was let through after it is not
    in it, and what was answered after it still is. So a replica's figures are brought up to now, its share of
    the ledger being the whole spread over the live replicas as Serve's router spreads requests: a body read
    counts against its held requests (--max-queued-requests), one still being read against its uploads
    (--max-uploads), as the replica counts them. A burst between two reports is then refused here, at once,
    rather than routed to a full replica and refused there behind its decoding; and a request answered just
    after a report does not make the next one refused."""
    alive = live(reports, now)
    if not alive:
        return None
    reasons = [_unready(r, passed, len(alive)) for r in alive]
    if any(reason is None for reason in reasons):
        return None
    return reasons[0], min(r.get("retry_after_s", 1.0) for r in alive)


def _unready(report: dict[str, Any], passed: Sequence[tuple[float, bool, float | None]], replicas: int) -> str | None:
    max_held, max_uploads = report.get("max_held"), report.get("max_uploads")
    if report.get("draining") or not (max_held and max_uploads):  # draining, or a report without its limits
        return report.get("unready")
    at = report.get("time", 0.0)
    coming = [read for when, read, answered in passed if when > at and answered is None]
    gone = sum(1 for when, _, answered in passed if answered is not None and when <= at < answered)
    held = max(0.0, report.get("held_requests", 0) + (sum(coming) - gone) / replicas)
    uploads = report.get("uploads", 0) + (len(coming) - sum(coming)) / replicas
    if held >= max_held:
        return f"at capacity: {max_held} requests queued or decoding (--max-queued-requests {max_held})"
    if uploads >= max_uploads:
        return f"at capacity: {max_uploads} uploads being read (--max-uploads {max_uploads})"
    return None


class Reporter:
    """A replica's side: `report()` published every REPORT_S on a thread of its own (the replica's event loop
    may be busy), and at once by `now()` (after a batch, so that the figures a client reads next include it)."""

    def __init__(self, app: str, replica: str, report: Callable[[], dict[str, Any]]):
        self.app, self.replica, self.report = app, replica, report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health-report", daemon=True)
        self._thread.start()

    def now(self) -> None:
        try:
            publish(self.app, self.replica, self.report())
        except Exception:  # the store unreachable for a moment: the next report tries again
            log.debug("health report failed", exc_info=True)

    def _loop(self) -> None:
        while not self._stop.wait(REPORT_S):
            self.now()

    def close(self) -> None:
        self._stop.set()
