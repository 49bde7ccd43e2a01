"""The output directory: parts written as files finish, resume across runs, and an index that commits a run.

Layout of OUTPUT_DIR (local or object storage):

    part-<run>-<random>.parquet   output rows, written by the assemble stage as files finish (parts.py)
    _index-<run>.parquet          id -> part, one row per manifest row: which row of which part is the answer
    _SUCCESS                      JSON: the run that committed, its index, its summary; written last

A run begins by removing `_SUCCESS` (the table is about to change) and what killed runs left half-written (our
own temporary files), then reads the parts that are ours (marked, in the output schema; parts.read_part) to
find the manifest rows already done; anything else in the directory is left alone and never read. The latest
row of an id wins, so a rerun never rewrites old parts: it only adds new ones. When every manifest row has a
row, the run writes its index and `_SUCCESS`; readers go through them (`read_results`), so a table is always
one row per manifest row of the run that committed it.
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

from .. import schema
from . import storage
from ..config import StorageOptions
from ..errors import LOST, IncompleteOutputError, OutputError, kind_of, row_error
from .parts import PART_PREFIX, SCHEMA_VERSION, TEMP_PREFIX, PartWriter, read_part

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
INDEX_PREFIX = "_index-"
TOOL = "ray_whisper"
SCAN_COLUMNS = [schema.ID, schema.STATUS, schema.ERROR, schema.DURATION_S, schema.MODEL, schema.FINGERPRINT]


def new_run_id() -> str:
    """Sortable by start time (UTC), unique."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass
class OutputDir:
    uri: str
    fs: Any
    root: str  # the directory as the filesystem names it
    storage: StorageOptions

    @classmethod
    def open(cls, uri: str, options: StorageOptions | None = None) -> OutputDir:
        options = options or StorageOptions()
        fs = storage.filesystem(uri, options)
        return cls(uri.rstrip("/"), fs, storage.strip(uri, fs).rstrip("/"), options)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def check_writable(self) -> None:
        """Create the directory and write, then delete, a probe object: fails fast on a missing bucket,
        denied access or a wrong endpoint, with advice that fits the kind of location."""
        local = not storage.is_object_store(self.uri) and storage.protocol(self.uri) == "file"
        if local and self.fs.isfile(self.root):
            raise OutputError(f"output {self.uri} is a file, not a directory; give a directory (it is created if missing)")
        probe = self.path(f"_probe-{secrets.token_hex(4)}")
        try:
            if not storage.is_object_store(self.uri):  # s3fs' makedirs would create a missing (mistyped) bucket
                self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ray_whisper write check\n")
            self.fs.rm(probe)
        except Exception as e:
            fix = ("check that the directory's parent exists and that you may write there" if local else
                   "check that the bucket exists, the credentials allow writing, and the endpoint is right")
            raise OutputError(f"output {self.uri} is not writable: {storage.describe_error(e, self.uri)}; {fix}") from e

    def writer(self, run_id: str) -> PartWriter:
        return PartWriter(self.uri, self.storage, run_id)

    def _names(self) -> list[str]:
        try:
            return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def rows(self) -> pa.Table:
        """Every column of the latest row of every id in our parts, whether or not a run committed."""
        return self.scan(None).drop_columns([schema.PART])

    def scan(self, columns: list[str] | None = SCAN_COLUMNS) -> pa.Table:
        """The latest row of every id in our parts (`columns` and `part`); foreign files are skipped."""
        tables, foreign = [], []
        for name in self._names():
            if not (name.startswith(PART_PREFIX) and name.endswith(".parquet")):
                continue
            table, why = read_part(self.fs, self.path(name), columns)
            if table is None:
                foreign.append(f"{name} ({why})")
                continue
            tables.append(table.append_column(schema.PART, pa.array([name] * table.num_rows, pa.string())))
        if foreign:
            log.warning("%d file(s) in %s named like parts are not ours and are ignored (left as they are): %s",
                        len(foreign), self.uri, "; ".join(foreign[:3]) + ("; ..." if len(foreign) > 3 else ""))
        if not tables:
            fields = [schema.OUTPUT_SCHEMA.field(c) for c in (columns or schema.OUTPUT_SCHEMA.names)]
            return pa.schema(fields + [pa.field(schema.PART, pa.string())]).empty_table()
        return latest_per_id(pa.concat_tables(tables))

    def begin(self, manifest: pa.Table, fingerprint: str, *, overwrite: bool, retry_errors: bool) -> tuple[pa.Table, pa.Table]:
        """Prepare the directory for a run: returns (the manifest rows still to do, the rows already done)."""
        self.check_writable()
        names = self._names()
        for name in names:
            if name == SUCCESS or name.startswith(TEMP_PREFIX) or (overwrite and name.startswith(INDEX_PREFIX)):
                self.fs.rm(self.path(name))
        if overwrite:
            for name in self.scan()[schema.PART].unique().to_pylist():
                self.fs.rm(self.path(name))
        existing = self.scan()
        existing = existing.filter(pc.is_in(existing[schema.ID], manifest[schema.ID]))
        lost = pc.starts_with(pc.fill_null(existing[schema.ERROR], ""), f"{LOST}:")
        redo = pc.or_(lost, pc.equal(existing[schema.STATUS], schema.STATUS_ERROR)) if retry_errors else lost
        done = existing.filter(pc.invert(redo))
        other = done.filter(pc.not_equal(pc.fill_null(done[schema.FINGERPRINT], ""), fingerprint))
        if other.num_rows:
            models = ", ".join(sorted(set(m for m in other[schema.MODEL].to_pylist() if m)))
            log.warning("%d row(s) in %s were made with other options (model %s; fingerprint differs from %s); "
                        "they are kept; --overwrite redoes them", other.num_rows, self.uri, models, fingerprint)
        return manifest.filter(pc.invert(pc.is_in(manifest[schema.ID], done[schema.ID]))), done

    def complete(self, manifest: pa.Table, done: pa.Table, receipts: pa.Table, run_id: str, model_name: str,
                 fingerprint: str) -> pa.Table:
        """The run's rows for every manifest row (SCAN_COLUMNS and `part`): earlier runs' and this one's; a
        row that came back from no worker gets an error row of kind `lost`, written now."""
        columns = [schema.ID, schema.STATUS, schema.ERROR, schema.DURATION_S, schema.PART]
        ours = receipts.select(columns)
        rows = pa.concat_tables([done.select(columns).cast(ours.schema), ours])
        missing = manifest.filter(pc.invert(pc.is_in(manifest[schema.ID], rows[schema.ID])))
        if missing.num_rows:
            log.error("%d manifest row(s) came back from no worker; writing error rows for them", missing.num_rows)
            reason = row_error(LOST, "no result came back from the cluster (worker or node lost); rerun to retry")
            lost = [schema.error_row(r[schema.ID], storage.public_uri(r[schema.AUDIO]), model_name, fingerprint, reason)
                    for r in missing.to_pylist()]
            part = self.writer(run_id).write(lost, kind="lost")
            rows = pa.concat_tables([rows, pa.Table.from_pylist(
                [{schema.ID: r[schema.ID], schema.STATUS: r[schema.STATUS], schema.ERROR: r[schema.ERROR],
                  schema.DURATION_S: None, schema.PART: part} for r in lost], schema=rows.schema)])
        return latest_per_id(rows)

    def commit(self, run_id: str, rows: pa.Table, summary: dict[str, Any]) -> None:
        """Write the index of `rows` (id -> part) and then `_SUCCESS`: from now on readers take the run's table
        as complete."""
        index = f"{INDEX_PREFIX}{run_id}.parquet"
        with self.fs.open(self.path(index), "wb") as f:
            pq.write_table(rows.select([schema.ID, schema.PART]), f)
        marker = {"tool": TOOL, "schema_version": SCHEMA_VERSION, "run_id": run_id, "index": index,
                  "rows": rows.num_rows, "summary": summary}
        with self.fs.open(self.path(SUCCESS), "wb") as f:
            f.write(json.dumps(marker, indent=2).encode())


def latest_per_id(rows: pa.Table) -> pa.Table:
    """One row per id: the one in the part that sorts last (parts are named by run start time)."""
    order = pc.sort_indices(rows, sort_keys=[(schema.ID, "ascending"), (schema.PART, "descending")])
    rows = rows.take(order)
    ids = rows[schema.ID].to_pylist()
    first = [i for i, x in enumerate(ids) if i == 0 or ids[i - 1] != x]
    return rows.take(pa.array(first, pa.int64()))


def error_counts(rows: pa.Table) -> dict[str, int]:
    """Error rows by kind."""
    counts: dict[str, int] = {}
    for status, err in zip(rows[schema.STATUS].to_pylist(), rows[schema.ERROR].to_pylist()):
        if status != schema.STATUS_OK:
            counts[kind_of(err)] = counts.get(kind_of(err), 0) + 1
    return counts


def read_results(output: str, options: StorageOptions | None = None) -> pa.Table:
    """The table of the run that committed `output`: one row per manifest row. Raises IncompleteOutputError
    when no run finished there."""
    out = OutputDir.open(output, options)
    try:
        marker = json.loads(out.fs.cat(out.path(SUCCESS)))
    except FileNotFoundError:
        raise IncompleteOutputError(
            f"{output} has no {SUCCESS}: its run did not finish; rerun the same command to complete it"
        ) from None
    except ValueError as e:
        raise IncompleteOutputError(f"{output}/{SUCCESS} was not written by ray_whisper ({e})") from e
    if marker.get("tool") != TOOL or marker.get("schema_version") != SCHEMA_VERSION:
        raise IncompleteOutputError(f"{output}/{SUCCESS} is not a ray_whisper {SCHEMA_VERSION} commit marker")
    with out.fs.open(out.path(marker["index"]), "rb") as f:
        index = pq.read_table(f)
    tables = []
    for part in index[schema.PART].unique().to_pylist():
        table, why = read_part(out.fs, out.path(part))
        if table is None:
            raise OutputError(f"{output}/{part}, listed by {SUCCESS}, is unreadable now: {why}")
        wanted = index.filter(pc.equal(index[schema.PART], part))[schema.ID]
        tables.append(table.filter(pc.is_in(table[schema.ID], wanted)))
    table = pa.concat_tables(tables).replace_schema_metadata(None) if tables else schema.OUTPUT_SCHEMA.empty_table()
    if table.num_rows != index.num_rows:
        raise OutputError(f"{output}: {SUCCESS}'s index lists {index.num_rows} rows but its parts hold {table.num_rows}")
    return table
