"""One Parquet part of the output: written whole or not at all, marked as ours, and checked when read.

A part carries key-value metadata (`ray_whisper`: the schema version and the run that wrote it). Reading a
part checks that mark and the output schema; a file without them (someone else's, a half-written upload, an
older format) is never trusted, and never deleted. On a local disk a part is written under a temporary name
(`.rw-tmp-<part>.tmp`: no reader's `*.parquet` glob matches it, DuckDB's included, which does match dot-files)
and renamed into place; on an object store one PUT makes it appear whole.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import schema
from . import storage
from ..config import StorageOptions

PART_PREFIX = "part-"
TEMP_PREFIX = ".rw-tmp-"  # a part being written (local disks); a run removes those its killed predecessors left
META_KEY = b"ray_whisper"
SCHEMA_VERSION = 4  # 1: no mark; 2: the mark, `fingerprint`; 3: languages per file and segment; 4: `words`


def part_name(run_id: str, kind: str = "") -> str:
    """part-<run>-<random>[-<kind>].parquet: a run's parts sort together and after earlier runs'."""
    return f"{PART_PREFIX}{run_id}-{secrets.token_hex(4)}{'-' + kind if kind else ''}.parquet"


@dataclass(frozen=True)
class PartWriter:
    """Writes output rows as one part of OUTPUT_DIR; picklable, so the stage that assembles files writes its
    own parts (the same filesystem options travel to it; credentials never do)."""

    uri: str  # OUTPUT_DIR
    storage: StorageOptions
    run_id: str

    def write(self, rows: list[dict[str, Any]], kind: str = "") -> str:
        """Write `rows` (output rows) as a new part; returns its name. Raises OSError when the store does."""
        fs = storage.filesystem(self.uri, self.storage)
        name = part_name(self.run_id, kind)
        put_whole(fs, self.uri, storage.strip(self.uri, fs).rstrip("/"), name, marked_table(rows, self.run_id))
        return name


def put_whole(fs: Any, uri: str, root: str, name: str, table: pa.Table) -> None:
    """Write `table` as `root/name`, whole or not at all: one PUT on an object store, a temporary file renamed
    into place on a disk."""
    if storage.is_object_store(uri):
        with fs.open(f"{root}/{name}", "wb") as f:
            pq.write_table(table, f)
        return
    temp = f"{root}/{TEMP_PREFIX}{name}.tmp"
    try:
        with fs.open(temp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(temp, f"{root}/{name}")
    except BaseException:
        _remove_quietly(fs, temp)
        raise


def marked_table(rows: list[dict[str, Any]], run_id: str) -> pa.Table:
    """Output rows as a table in the output schema, with the mark that makes a part ours."""
    meta = {"schema_version": SCHEMA_VERSION, "run_id": run_id}
    return pa.Table.from_pylist(rows, schema=schema.OUTPUT_SCHEMA).replace_schema_metadata(
        {META_KEY: json.dumps(meta).encode()}
    )


def _remove_quietly(fs: Any, path: str) -> None:
    try:
        fs.rm(path)
    except OSError:
        pass


def run_of(part: pa.Table) -> str:
    """The run that wrote a part (its mark), read from a table that read_part returned."""
    return json.loads(part.schema.metadata[META_KEY])["run_id"]


def read_part(fs: Any, path: str, columns: list[str] | None = None) -> tuple[pa.Table | None, str]:
    """A part's rows when it is one of ours in the current format, else (None, why it is not trusted)."""
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            found = parquet.schema_arrow
            mark = (found.metadata or {}).get(META_KEY)
            if mark is None:
                return None, "not written by ray_whisper (no ray_whisper mark)"
            version = json.loads(mark).get("schema_version")
            if version != SCHEMA_VERSION:
                return None, f"written by another ray_whisper version (schema {version}, this one reads {SCHEMA_VERSION})"
            if not found.remove_metadata().equals(schema.OUTPUT_SCHEMA):
                return None, "its columns are not the output schema"
            return parquet.read(columns=columns), ""
    except (pa.ArrowInvalid, OSError, ValueError, json.JSONDecodeError, AttributeError) as e:
        return None, f"not a readable Parquet file ({type(e).__name__})"
