"""`ray-whisper export OUTPUT_DIR DEST`: one file per ok row and format (DEST/<id>.srt, ...), local or remote.

An id with "/" in it becomes sub-folders (ids from a prefix or glob listing keep their folder layout); an id
that would climb out of DEST ("..", an absolute path) is refused. Writes go through the same filesystems as
everything else (storage.py), in a few threads: on an object store each file is one PUT.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .. import schema
from . import storage
from ..config import ExportOptions, StorageOptions
from ..errors import IncompleteOutputError, OutputError
from .output import OutputDir, read_results
from .subtitles import render

log = logging.getLogger(__name__)

WRITERS = 16  # files written at once (object stores: PUTs in flight)


@dataclass
class Exported:
    files: int
    rows: int
    skipped_errors: int
    dest: str

    def __str__(self) -> str:
        skipped = f"; {self.skipped_errors} error row(s) have no transcript and were skipped" if self.skipped_errors else ""
        return f"exported {self.files} file(s) for {self.rows} row(s) to {self.dest}{skipped}"


def export(output: str, dest: str, options: ExportOptions | None = None,
           storage_options: StorageOptions | None = None) -> Exported:
    """Write each ok row of the run in `output` as DEST/<id>.<format> for every format asked for."""
    options = options or ExportOptions()
    storage_options = (storage_options or StorageOptions()).resolved()
    table = _rows(output, options, storage_options)
    ok = table.filter(pc.equal(table[schema.STATUS], schema.STATUS_OK)).to_pylist()
    fs = storage.filesystem(dest, storage_options)
    root = storage.strip(dest, fs).rstrip("/")
    named = [(r, _relative(r[schema.ID])) for r in ok]
    refused = [r[schema.ID] for r, rel in named if rel is None]
    if refused:
        log.warning("%d id(s) cannot name a file below %s (empty, absolute or with ..) and are skipped: %s",
                    len(refused), dest, ", ".join(map(repr, refused[:5])))
    jobs = [(f"{root}/{rel}.{fmt}", r, fmt) for r, rel in named if rel is not None for fmt in options.formats]
    if not storage.is_object_store(dest):
        for folder in sorted({posixpath.dirname(path) for path, _, _ in jobs}):
            fs.makedirs(folder, exist_ok=True)

    def write(job: tuple[str, dict[str, Any], str]) -> None:
        path, row, fmt = job
        with fs.open(path, "wb") as f:
            f.write(render(row, fmt).encode("utf-8"))

    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(write, jobs))
    except OSError as e:
        raise OutputError(f"cannot write to {dest}: {storage.describe_error(e, dest)}") from e
    return Exported(len(jobs), len(ok) - len(refused), table.num_rows - len(ok), dest)


def _rows(output: str, options: ExportOptions, storage_options: StorageOptions) -> pa.Table:
    try:
        return read_results(output, storage_options)
    except IncompleteOutputError as e:
        if not options.partial:
            raise OutputError(f"{e}; or export the rows there now with --partial") from e
    return OutputDir.open(output, storage_options).rows()


def _relative(file_id: str) -> str | None:
    """The id as a path below DEST, or None for one that would leave it."""
    parts = [p for p in file_id.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts or file_id.startswith(("/", "\\")):
        return None
    return "/".join(parts)
