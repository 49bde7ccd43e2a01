"""The output directory: parts written as files finish, resume across runs, and a commit that leaves one row per
id in the data files.

Layout of OUTPUT_DIR (local or object storage):

    part-<run>-<random>.parquet       output rows, written by the assemble stage as files finish (parts.py)
    _SUCCESS                          JSON: the run that committed, its index, its summary; written last
    _ray_whisper/index-<run>.arrow    id -> part for every manifest row of that run (Arrow IPC)
    _ray_whisper/lease.json           the run writing here now: one writer at a time (lease.py)

Only the data rows match `*.parquet`, at the top or in any sub-folder, so every engine's reader (pandas,
pyarrow, DuckDB, Polars, Spark, Ray Data) sees them and nothing else: the run's metadata is neither Parquet nor
beside the parts, and a part being written is `.rw-tmp-<part>.tmp` (DuckDB's globs match dot-files).

A run first takes the directory's lease (lease.py; a second run exits 2). Holding it, it begins by removing
`_SUCCESS` (the table is about to change) and what killed runs left half-written (temporary files of other runs:
none of them is live while the lease is ours), then reads the parts that are ours (marked, in the output schema;
parts.read_part) to find the manifest rows already done; anything else in the directory is left alone and never
read. While a run goes, the latest row of an id wins (parts sort by run start). At commit the rows that lost
leave the data files: each part that holds one is rewritten beside with only its current rows and then removed,
a part without any is never touched; with --overwrite, every part of earlier runs goes then, not before. Then
the index and `_SUCCESS` are written. So a committed directory holds one row per id in its parts, whichever
engine reads it; `read_results` returns the committing run's manifest rows (a directory that served other
manifests holds their ids' rows too). Directories committed before the index moved (`_index-<run>.parquet`
beside the parts) are read and resumed as they are; their next commit moves the index.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import schema
from . import storage
from ..config import StorageOptions
from ..errors import LOST, IncompleteOutputError, OutputError, kind_of, row_error
from .lease import Lease, holding
from .parts import PART_PREFIX, SCHEMA_VERSION, TEMP_PREFIX, PartWriter, part_name, put_whole, read_part, run_of

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"  # where Spark and Hadoop put theirs; not Parquet, and skipped by directory readers
META = "_ray_whisper"  # run metadata, out of every reader's `*.parquet` glob
INDEX_PREFIX = "index-"  # META/index-<run>.arrow
LEASE = f"{META}/lease.json"  # who writes here now (lease.py)
LEGACY_INDEX_PREFIX = "_index-"  # <dir>/_index-<run>.parquet, before the index moved into META
TOOL = "ray_whisper"
INDEX_SCHEMA = pa.schema([pa.field(schema.ID, pa.string()), pa.field(schema.PART, pa.string())])
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
    replacing: bool = False  # begun with --overwrite: at commit, every part of earlier runs goes
    lease: Lease | None = None  # held while a run writes here (held())

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

    @contextlib.contextmanager
    def held(self, run_id: str, **timing: float) -> Iterator[Lease]:
        """The directory's lease for `run_id` over the block, released on every way out: while it is held, another
        run on this directory stops at once with OutputBusyError (exit 2). Checks the directory writable first."""
        self.check_writable()
        with holding(self.fs, self.uri, self.path(LEASE), run_id, **timing) as held:
            self.lease = held
            try:
                yield held
            finally:
                self.lease = None

    def writer(self, run_id: str) -> PartWriter:
        return PartWriter(self.uri, self.storage, run_id)

    def _names(self, folder: str = "") -> list[str]:
        try:
            listed = self.fs.ls(self.path(folder) if folder else self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in listed)

    def rows(self) -> pa.Table:
        """Every column of the latest row of every id in our parts, whether or not a run committed."""
        return self.scan(None).drop_columns([schema.PART])

    def scan(self, columns: list[str] | None = SCAN_COLUMNS) -> pa.Table:
        """The latest row of every id in our parts (`columns` and `part`); foreign files are skipped."""
        return latest_per_id(self._every_row(columns))

    def _every_row(self, columns: list[str] | None) -> pa.Table:
        """Every row of our parts (`columns` and `part`), superseded ones too; foreign files are skipped."""
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
        return pa.concat_tables(tables) if tables else _no_rows(columns)

    def begin(self, manifest: pa.Table, fingerprint: str, *, overwrite: bool, retry_errors: bool) -> tuple[pa.Table, pa.Table]:
        """Prepare the directory for a run: returns (the manifest rows still to do, the rows already done).
        With `overwrite` every row is to do, and the old rows stay (readable) until this run commits."""
        self.check_writable()
        for name in self._names():
            if name == SUCCESS or self._dead_temp(name):
                self.fs.rm(self.path(name))
        self.replacing = overwrite
        if overwrite:
            return manifest, _no_rows(SCAN_COLUMNS)
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

    def _dead_temp(self, name: str) -> bool:
        """A temporary part that no live run is writing: only the lease's holder knows that, and its own are live."""
        return (self.lease is not None and name.startswith(TEMP_PREFIX)
                and not name.startswith(f"{TEMP_PREFIX}{PART_PREFIX}{self.lease.run_id}-"))

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
        """Make the parts hold one row per id (compact), write the index of `rows` (id -> part), remove older
        indexes, and then write `_SUCCESS`: from now on readers take the run's table as complete. A run whose lease
        was taken over (held(): it stopped renewing for longer than the expiry) raises OutputError instead."""
        if self.lease is not None:
            self.lease.confirm()
        rows = self.compact(rows)
        index = f"{META}/{INDEX_PREFIX}{run_id}.arrow"
        if not storage.is_object_store(self.uri):
            self.fs.makedirs(self.path(META), exist_ok=True)
        with self.fs.open(self.path(index), "wb") as f, pa.ipc.new_file(f, INDEX_SCHEMA) as ipc:
            ipc.write_table(rows.select([schema.ID, schema.PART]).cast(INDEX_SCHEMA))
        stale = [n for n in self._names() if n.startswith(LEGACY_INDEX_PREFIX) and n.endswith(".parquet")]
        stale += [f"{META}/{n}" for n in self._names(META) if n.startswith(INDEX_PREFIX) and f"{META}/{n}" != index]
        for name in stale:
            self.fs.rm(self.path(name))
        marker = {"tool": TOOL, "schema_version": SCHEMA_VERSION, "run_id": run_id, "index": index,
                  "rows": rows.num_rows, "summary": summary}
        with self.fs.open(self.path(SUCCESS), "wb") as f:
            f.write(json.dumps(marker, indent=2).encode())

    def compact(self, rows: pa.Table) -> pa.Table:
        """Take the rows that lost out of the data files; returns `rows` (id -> part) with the parts' new names.

        The current row of a manifest id is the one in `rows`; of any other id, the latest (or none, when the
        run was begun with --overwrite: every part of earlier runs goes). A part that holds a row that is not
        current is rewritten beside with only its current rows, then removed (removed at once when none is
        left); other parts are left as they are. A commit cut short leaves at worst a part and its rewrite,
        with the same rows; the next commit keeps one of them."""
        every = self._every_row([schema.ID])
        current = rows.select([schema.ID, schema.PART]).cast(INDEX_SCHEMA)
        if not self.replacing:
            latest = latest_per_id(every).select([schema.ID, schema.PART]).cast(INDEX_SCHEMA)
            current = pa.concat_tables([latest.filter(pc.invert(pc.is_in(latest[schema.ID], current[schema.ID]))), current])
        joined = every.join(current.rename_columns([schema.ID, "current"]), schema.ID, join_type="left outer")
        stale = joined.filter(pc.invert(pc.fill_null(pc.equal(joined["current"], joined[schema.PART]), False)))
        renamed = {}
        for name in sorted(stale[schema.PART].unique().to_pylist()):
            keep = current.filter(pc.equal(current[schema.PART], name))[schema.ID]
            renamed[name] = self._rewrite(name, keep)
        if renamed:
            log.info("%d part(s) in %s held superseded rows and were rewritten without them", len(renamed), self.uri)
            parts = [renamed.get(p, p) for p in rows[schema.PART].to_pylist()]
            rows = rows.set_column(rows.schema.get_field_index(schema.PART), schema.PART, pa.array(parts, pa.string()))
        return rows

    def _rewrite(self, name: str, keep: pa.Array) -> str | None:
        """The part `name` with only the rows of ids in `keep`, written beside under a new name (same run, so it
        sorts as the old one did), then the old one removed; the new name, or None when nothing was kept."""
        table, why = read_part(self.fs, self.path(name))
        if table is None:
            raise OutputError(f"{self.uri}/{name} cannot be compacted: it is unreadable now ({why})")
        kept = table.filter(pc.is_in(table[schema.ID], keep))
        new = None
        if kept.num_rows:
            new = part_name(run_of(table), "lost" if name.endswith("-lost.parquet") else "")
            put_whole(self.fs, self.uri, self.root, new, kept)
        self.fs.rm(self.path(name))
        return new


def _no_rows(columns: list[str] | None) -> pa.Table:
    fields = [schema.OUTPUT_SCHEMA.field(c) for c in (columns or schema.OUTPUT_SCHEMA.names)]
    return pa.schema(fields + [pa.field(schema.PART, pa.string())]).empty_table()


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
    index = _read_index(out, marker["index"])
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


def _read_index(out: OutputDir, name: str) -> pa.Table:
    """The committed index: Arrow IPC under META, or Parquet beside the parts (directories committed before)."""
    data = out.fs.cat(out.path(name))
    if name.endswith(".parquet"):
        return pq.read_table(pa.BufferReader(data))
    return pa.ipc.open_file(pa.BufferReader(data)).read_all()
