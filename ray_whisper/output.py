"""The output directory: Parquet parts written by the workers, resume across runs, and a commit marker.

Layout of OUTPUT_DIR (local or object storage):

    part-<run>-<task>.parquet   rows written by the workers of one run, immutable once complete
    _SUCCESS                    JSON summary, written last; present only when every manifest row has a row

A run first removes `_SUCCESS` (the table is about to change), deletes part files that cannot be read
(a run killed mid-write), and skips manifest rows already present. So a rerun of the same command
processes only what is missing, and a run killed half-way, then rerun, ends with exactly one row per
manifest row. Readers that need a complete table check `_SUCCESS` (`read_results` does).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema, storage
from .assemble import error_row
from .config import StorageOptions
from .errors import LOST, IncompleteOutputError, OutputError, row_error

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
PART_PREFIX = "part-"


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass
class OutputDir:
    uri: str
    fs: Any
    root: str  # the directory as the filesystem names it

    @classmethod
    def open(cls, uri: str, options: StorageOptions | None = None) -> "OutputDir":
        fs = storage.filesystem(uri, options)
        return cls(uri.rstrip("/"), fs, storage.strip(uri, fs).rstrip("/"))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def check_writable(self) -> None:
        """Create the directory and write, then delete, a probe object: fails fast on a missing bucket,
        denied access or a wrong endpoint."""
        probe = self.path(f"_probe-{secrets.token_hex(4)}")
        try:
            if not storage.is_object_store(self.uri):  # s3fs' makedirs would create a missing (mistyped) bucket
                self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ray_whisper write check\n")
            self.fs.rm(probe)
        except Exception as e:
            raise OutputError(
                f"output {self.uri} is not writable: {storage.describe_error(e)}. "
                "Check that the bucket/directory exists, the credentials allow writing, and the endpoint is right."
            ) from e

    def parts(self) -> list[str]:
        try:
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.rsplit("/", 1)[-1].startswith(PART_PREFIX) and n.endswith(".parquet"))

    def _read_part(self, path: str, columns: list[str] | None) -> pa.Table | None:
        try:
            with self.fs.open(path, "rb") as f:
                return pq.read_table(f, columns=columns, schema=schema.OUTPUT_SCHEMA)
        except (pa.ArrowInvalid, OSError, ValueError):
            return None

    def scan(self, columns: list[str] | None = None, remove_broken: bool = False) -> pa.Table:
        """All rows of the readable part files, with the part's path in a `_part` column."""
        tables = []
        for path in self.parts():
            table = self._read_part(path, columns)
            if table is None:
                if remove_broken:
                    log.warning("removing unreadable part %s (left by a run that stopped mid-write)", path)
                    self.fs.rm(path)
                continue
            tables.append(table.append_column("_part", pa.array([path] * table.num_rows, pa.string())))
        if not tables:
            cols = [schema.OUTPUT_SCHEMA.field(c) for c in (columns or schema.OUTPUT_SCHEMA.names)]
            return pa.schema(cols + [pa.field("_part", pa.string())]).empty_table()
        return pa.concat_tables(tables)

    def begin(self, manifest: pa.Table, *, overwrite: bool, retry_errors: bool) -> pa.Table:
        """Prepare the directory for a run; return the manifest rows that still need a result."""
        self.check_writable()
        if self.fs.exists(self.path(SUCCESS)):
            self.fs.rm(self.path(SUCCESS))
        if overwrite:
            for path in self.parts():
                self.fs.rm(path)
        existing = self.scan([schema.ID, schema.STATUS], remove_broken=True)
        wanted = manifest[schema.ID]
        if retry_errors:
            retry = pc.and_(pc.equal(existing[schema.STATUS], schema.STATUS_ERROR), pc.is_in(existing[schema.ID], wanted))
            self._drop_rows(existing.filter(retry))
            existing = existing.filter(pc.invert(retry))
        done = pc.is_in(wanted, existing[schema.ID])
        stray = existing.num_rows - int(pc.sum(pc.is_in(existing[schema.ID], wanted)).as_py() or 0)
        if stray:
            log.warning("%d row(s) in %s belong to no row of this manifest; they are kept", stray, self.uri)
        return manifest.filter(pc.invert(done))

    def _drop_rows(self, rows: pa.Table) -> None:
        """Rewrite the parts holding `rows` without them (write the new file, then remove the old)."""
        for path in set(rows["_part"].to_pylist()):
            table = self._read_part(path, None)
            if table is None:
                continue
            drop = pc.is_in(table[schema.ID], rows.filter(pc.equal(rows["_part"], path))[schema.ID])
            kept = table.filter(pc.invert(drop))
            if kept.num_rows:
                new = path[: -len(".parquet")] + f"-r{secrets.token_hex(2)}.parquet"
                with self.fs.open(new, "wb") as f:
                    pq.write_table(kept, f)
            self.fs.rm(path)

    def complete(self, manifest: pa.Table, run_id: str, model_name: str) -> pa.Table:
        """Give every manifest row without a row an error row; return the whole table (one listing)."""
        table = self.scan()
        missing = manifest.filter(pc.invert(pc.is_in(manifest[schema.ID], table[schema.ID])))
        if missing.num_rows:
            log.error("%d manifest row(s) came back from no worker; writing error rows for them", missing.num_rows)
            reason = row_error(LOST, "no result came back from the cluster (worker or node lost); rerun to retry")
            rows = [error_row(r[schema.ID], r[schema.AUDIO], model_name, reason) for r in missing.to_pylist()]
            lost = pa.Table.from_pylist(rows, schema=schema.OUTPUT_SCHEMA)
            path = self.path(f"{PART_PREFIX}{run_id}-lost.parquet")
            with self.fs.open(path, "wb") as f:
                pq.write_table(lost, f)
            table = pa.concat_tables([table, lost.append_column("_part", pa.array([path] * lost.num_rows, pa.string()))])
        ids = table[schema.ID]
        if len(pc.unique(ids)) != len(ids):
            log.error("duplicate ids in %s: a reader would see some files twice", self.uri)
        return table

    def commit(self, summary: dict[str, Any]) -> None:
        """Write `_SUCCESS` (the run's summary): from now on readers take the table as complete."""
        with self.fs.open(self.path(SUCCESS), "wb") as f:
            f.write(json.dumps(summary, indent=2).encode())

    def finish(self, manifest: pa.Table, run_id: str, model_name: str, summary: dict[str, Any]) -> pa.Table:
        """complete() then commit(summary); returns the table."""
        table = self.complete(manifest, run_id, model_name)
        self.commit(summary)
        return table


def read_results(output: str, options: StorageOptions | None = None) -> pa.Table:
    """The complete output table of a finished run, one row per manifest row; raises
    IncompleteOutputError when the run that wrote it did not finish."""
    out = OutputDir.open(output, options)
    if not out.fs.exists(out.path(SUCCESS)):
        raise IncompleteOutputError(f"{output} has no {SUCCESS}: its run did not finish; rerun the same command to complete it")
    return out.scan().drop_columns(["_part"])
