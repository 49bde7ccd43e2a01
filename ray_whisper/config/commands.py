"""The option groups of `ray-whisper export` and `ray-whisper serve`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import EXPORT_FORMATS, _check, _Group, _opt, flag

@dataclass(frozen=True)
class ExportOptions(_Group):
    """`ray-whisper export`: which files to write from a run's table."""

    title: ClassVar[str] = "export"

    format: str = _opt("srt,vtt,txt,json", "Comma-separated formats to write per ok row: srt, vtt, txt, json.",
                       "LIST")
    partial: bool = _opt(False, "Export from an OUTPUT_DIR whose run did not finish (no _SUCCESS): the rows there now.")

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in EXPORT_FORMATS]
        _check(bool(self.formats) and not unknown,
               f"--format {self.format!r}: choose from {', '.join(EXPORT_FORMATS)}, comma-separated (e.g. srt,vtt)")

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.strip().lower() for f in self.format.split(",") if f.strip()))


@dataclass(frozen=True)
class ServeOptions(_Group):
    """`ray-whisper serve`: the endpoint, its batching and its replicas."""

    title: ClassVar[str] = "the endpoint"

    host: str = _opt("127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    port: int = _opt(8000, "Port of the HTTP endpoint.")
    max_upload_mb: float = _opt(25.0, "Largest upload accepted, in MB (larger: 413).")
    max_batch_size: int | None = _opt(None, "Most chunks, of all requests in flight, decoded together. Default: 32 on a "
                                      "GPU, 16 on CPU (where a batch's time is each request's wait), fewer for big models.")
    batch_wait_timeout_s: float = _opt(0.05, "How long a batch's first chunk waits for others to join it.")
    min_replicas: int = _opt(1, "Fewest model replicas (autoscaling lower bound).")
    max_replicas: int = _opt(1, "Most model replicas (autoscaling upper bound).")
    gpus_per_replica: float | None = _opt(None, "GPUs per replica. Default: 1 when the cluster has GPUs, else 0.")
    cpus_per_replica: float = _opt(1.0, "CPUs reserved by each replica.")
    max_queued_requests: int | None = _opt(None, "Requests a replica holds past their upload (waiting or decoding); "
                                           "more get 503 + Retry-After at once. Default: 1.5 x the batch size.")
    queue_timeout_s: float | None = _opt(None, "Refuse (503) a chunk that waited this long for a batch. Default: none.")
    max_uploads: int = _opt(128, "Uploads a replica reads at once; more get 503 with Retry-After.")
    upload_timeout_s: float = _opt(30.0, "Time to send a request's whole body; slower: 408.")
    drain_timeout_s: float = _opt(60.0, "On SIGTERM/Ctrl-C: time for requests in flight to finish (new ones: 503).")
    max_ongoing_requests: int | None = _opt(None, "Serve's slots per replica. Default: queued + uploads + 32.")

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "--port must be a TCP port (1-65535)")
        _check(0 <= self.batch_wait_timeout_s <= 10, "--batch-wait-timeout-s must be in [0, 10] seconds")
        _check(1 <= self.min_replicas <= self.max_replicas,
               f"--min-replicas ({self.min_replicas}) must be >= 1 and <= --max-replicas ({self.max_replicas})")
        _check(self.gpus_per_replica is None or 0 <= self.gpus_per_replica <= 8, "--gpus-per-replica must be in [0, 8]")
        for name in ("max_upload_mb", "max_batch_size", "cpus_per_replica", "max_queued_requests", "queue_timeout_s",
                     "max_uploads", "upload_timeout_s", "drain_timeout_s", "max_ongoing_requests"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, f"{flag(name)} must be > 0")
