"""Where a run's seconds went: what its model actors measured (start, model load, time in batches, the engine's
asr.tally) and the driver's phases, put together in the run's summary (report.Summary.account, in _SUCCESS) as
consecutive phases from the run's start to its summary.

Each model actor reports after every batch into Ray's internal key-value store under the run's key, one entry
per actor, overwritten (a replaced actor's last report stays). The driver reads them once the data has flowed:
no column in the data, no actor of its own. Times are epoch seconds, comparable between the processes of one
machine (between nodes, as far as their clocks agree).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from ..asr.tally import Tally

log = logging.getLogger(__name__)

NAMESPACE = "ray_whisper_account"
# the phases of a run, in order: each ends where the next begins (the key names the moment it ends)
PHASES = (("prepare", "prepared"),  # manifest read, output checked, model resolved, earlier rows found
          ("ray_start", "ray_started"),  # a local Ray started, or the cluster joined
          ("actor_start", "load_started"),  # the dataset planned, the model actor's process up, its imports
          ("model_load", "loaded"),  # the engine built: weights read, dtype and kernels set
          ("first_input", "first_batch"),  # waiting for the first chunks (fetch, decode, features)
          ("model", "last_batch_end"),  # the first batch's start to the last batch's end: busy and waiting
          ("drain", "ran"),  # the last batch's rows assembled and written; the dataset's end
          ("complete", "ended"))  # rows lost by workers filled in, the summary counted


@dataclass
class ActorClock:
    """One model actor's times: epoch seconds, and seconds."""

    load_started: float
    loaded: float
    first_batch: float | None = None
    last_batch_end: float | None = None
    busy_s: float = 0.0  # in batches (features from bytes, the engine, token rows)
    batches: int = 0
    threads: int | None = None

    def batch(self, started: float, ended: float) -> None:
        self.first_batch = started if self.first_batch is None else self.first_batch
        self.last_batch_end = ended
        self.busy_s += ended - started
        self.batches += 1


def report(key: str, clock: ActorClock, tally: Tally) -> None:
    """A model actor's account so far, under the run's key (best effort: a failed put loses nothing else)."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_put

    try:
        _internal_kv_put(f"{key}:{ray.get_runtime_context().get_actor_id()}",
                         json.dumps({"clock": asdict(clock), "tally": tally.as_dict()}), namespace=NAMESPACE)
    except Exception:  # the account is a measurement: the run goes on without it
        log.debug("could not report the model actor's account", exc_info=True)


def collect(key: str) -> list[dict[str, Any]]:
    """The model actors' last reports under `key` (removed from the store as they are read)."""
    from ray.experimental.internal_kv import (
        _internal_kv_del,
        _internal_kv_get,
        _internal_kv_list,
    )

    try:
        reports = [_internal_kv_get(k, namespace=NAMESPACE) for k in _internal_kv_list(f"{key}:", namespace=NAMESPACE)]
        _internal_kv_del(f"{key}:", del_by_prefix=True, namespace=NAMESPACE)
    except Exception:  # as above
        log.debug("could not read the model actors' accounts", exc_info=True)
        return []
    return [json.loads(r) for r in reports if r]


def account(moments: dict[str, float], actors: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's account: the phases (seconds) from the driver's `moments` (epoch seconds: started,
    prepared, ray_started, ran, ended) and the actor that finished last (the others ran beside it), the model
    stage's busy seconds over all actors, and their tallies summed."""
    clocks = [a["clock"] for a in actors if a["clock"].get("last_batch_end") is not None]
    at, last = dict(moments), {}
    if clocks:
        last = max(clocks, key=lambda c: c["last_batch_end"])
        at |= {k: last[k] for k in ("load_started", "loaded", "first_batch", "last_batch_end")}
    tally = Tally()
    for a in actors:
        tally = tally.add(a["tally"])
    return {
        "started": moments["started"],
        "phases_s": phases(at),
        "model_actors": len(actors),
        "model_threads": sorted({c.get("threads") for c in clocks if c.get("threads")}),
        "model_load_s": [round(a["clock"]["loaded"] - a["clock"]["load_started"], 3) for a in actors],
        "model_busy_s": round(sum(c["busy_s"] for c in clocks), 3),
        "model_phase_busy_s": round(last.get("busy_s", 0.0), 3),  # of the model phase, the last actor's batches
        "model_batches": sum(c["batches"] for c in clocks),
        "tally": tally.as_dict(),
    }


def phases(at: dict[str, float]) -> dict[str, float]:
    """Seconds of each of PHASES from `at["started"]`, a phase whose end is unknown (no actor reported; a
    run with nothing to do) joined to the next; they add up to `at["ended"] - at["started"]`."""
    out, since = {}, at["started"]
    pending: list[str] = []
    for name, end in PHASES:
        pending.append(name)
        if at.get(end) is None:
            continue
        out["+".join(pending)] = round(at[end] - since, 3)
        since, pending = at[end], []
    return out
