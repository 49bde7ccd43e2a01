"""What a run did and is doing: the progress shown while it runs, and the summary printed at the end of the CLI
and written into _SUCCESS."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import pyarrow as pa

from .. import schema
from ..io.output import error_counts

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What a run did; `str()` is the report printed at the end of the CLI."""

    files_ok: int
    files_failed: int
    audio_s: float
    wall_s: float
    output: str
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    skipped: int = 0  # rows already done by an earlier run (resume)
    account: dict[str, Any] = field(default_factory=dict)  # where the seconds went (batch.account); {} when unknown

    @property
    def rtfx(self) -> float:
        """Real-time factor: seconds of audio transcribed per second of wall time."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "files_ok": self.files_ok,
            "files_failed": self.files_failed,
            "audio_hours": round(self.audio_s / 3600, 4),
            "wall_s": round(self.wall_s, 2),
            "rtfx": round(self.rtfx, 2),
            "errors_by_kind": self.errors_by_kind,
            "skipped_already_done": self.skipped,
            "output": self.output,
        } | ({"account": self.account} if self.account else {})

    def __str__(self) -> str:
        lines = [
            f"files ok: {self.files_ok}   failed: {self.files_failed}",
            f"audio: {self.audio_s / 3600:.3f} h ({self.audio_s:.1f} s)   wall: {self.wall_s:.1f} s   "
            f"real-time factor: {self.rtfx:.1f}x",
        ]
        if self.skipped:
            lines.append(f"resumed: {self.skipped} file(s) were already done and were skipped")
        if self.errors_by_kind:
            lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(self.errors_by_kind.items())))
        lines.append(f"output: {self.output}")
        return "\n".join(lines)


def summarize(rows: pa.Table, receipts: pa.Table, wall_s: float, output: str, skipped: int = 0) -> Summary:
    """Counts over the manifest's rows (`rows`, one per manifest row, earlier runs' included); audio seconds and
    throughput over the files this run transcribed (`receipts`)."""
    ok = sum(s == schema.STATUS_OK for s in rows[schema.STATUS].to_pylist())
    audio_s = sum(d or 0.0 for d, s in zip(receipts[schema.DURATION_S].to_pylist(), receipts[schema.STATUS].to_pylist())
                  if s == schema.STATUS_OK)
    return Summary(ok, rows.num_rows - ok, audio_s, wall_s, output, error_counts(rows), skipped)


class Progress:
    """Files done of the total, audio hours done, and an ETA, from the receipts as parts reach storage: one line
    redrawn in place on a terminal, a log line every `interval_s` otherwise (a Ray job's log), also while
    nothing finishes (the model loading, a long file), so a quiet log still says the run is alive."""

    def __init__(self, total: int, stream: TextIO | None = None, interval_s: float | None = None):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        default = 1.0 if self.tty else float(os.environ.get("RAY_WHISPER_PROGRESS_INTERVAL_S", "10"))
        self.interval_s = interval_s if interval_s is not None else default
        self.started = time.monotonic()
        self.files = self.failed = 0
        self.audio_s = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="ray_whisper-progress")
        if self.interval_s > 0:
            self._ticker.start()

    def update(self, receipts: pa.Table) -> None:
        with self._lock:
            self.files += receipts.num_rows
            self.failed += sum(s != schema.STATUS_OK for s in receipts[schema.STATUS].to_pylist())
            self.audio_s += sum(d or 0.0 for d in receipts[schema.DURATION_S].to_pylist())
        if self.tty or self.interval_s == 0 or self.files >= self.total:
            self.show()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        eta = ""
        if 0 < self.files < self.total:
            eta = f"   eta {_clock(elapsed / self.files * (self.total - self.files))}"
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (f"files done: {self.files}/{self.total}{failed}   audio: {self.audio_s / 3600:.2f} h   "
                f"elapsed {_clock(elapsed)}{eta}")

    def show(self) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r" + self.line() + "\033[K")
                self.stream.flush()
            else:
                log.info("%s", self.line())

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.show()

    def close(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02}:{seconds % 60:02}"
