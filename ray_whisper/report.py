"""What a run did: the summary printed at the end of the CLI and written into _SUCCESS."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from . import schema
from .errors import kind_of


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
        }

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


def summarize(table: pa.Table, wall_s: float, output: str, run_id: str = "", skipped: int = 0) -> Summary:
    """Counts over the whole output; audio seconds and throughput over the rows this run wrote."""
    ok = [s == schema.STATUS_OK for s in table[schema.STATUS].to_pylist()]
    kinds: dict[str, int] = {}
    for good, err in zip(ok, table[schema.ERROR].to_pylist()):
        if not good:
            kinds[kind_of(err)] = kinds.get(kind_of(err), 0) + 1
    this_run = (
        [f"part-{run_id}-" in p for p in table["_part"].to_pylist()] if run_id and "_part" in table.column_names
        else [True] * table.num_rows
    )
    audio_s = sum(d or 0.0 for d, good, mine in zip(table[schema.DURATION_S].to_pylist(), ok, this_run) if good and mine)
    return Summary(sum(ok), len(ok) - sum(ok), audio_s, wall_s, output, kinds, skipped)
