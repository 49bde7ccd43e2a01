"""Read and check the manifest on the driver, before any worker starts.

A manifest is CSV, JSON Lines or Parquet (chosen by extension) with a required `audio` column and optional
`id` and `language` columns. Problems are ManifestErrors whose message names the file and what to fix.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import schema

FORMATS = {".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


class ManifestError(ValueError):
    """The manifest cannot be used as given; raised on the driver before the run starts."""


def manifest_format(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/")).lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            return FORMATS[ext]
    raise ManifestError(
        f"cannot tell the format of manifest {uri}: name it .csv, .jsonl or .parquet "
        f"(known extensions: {', '.join(sorted(FORMATS))})"
    )


def stable_id(audio: str) -> str:
    """The default id: the first 16 hex digits of the SHA-1 of the audio URI, stable across runs."""
    return hashlib.sha1(audio.encode("utf-8")).hexdigest()[:16]


def read_manifest(uri: str, filesystem: Any = None) -> pa.Table:
    """Read, check and normalise a manifest into a table with string columns id, audio, language."""
    fmt = manifest_format(uri)
    try:
        table = _read(uri, fmt, filesystem)
    except FileNotFoundError as e:
        raise ManifestError(f"manifest not found: {uri}") from e
    except PermissionError as e:
        raise ManifestError(f"manifest not readable (access denied): {uri}") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest {uri} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from e
    except pa.ArrowInvalid as e:
        text = str(e)
        if "UTF8" in text or "utf-8" in text.lower() or "utf8" in text.lower():
            raise ManifestError(f"manifest {uri} is not UTF-8 text; re-save it as UTF-8 ({_short(text)})") from e
        raise ManifestError(f"manifest {uri} is not valid {fmt.upper()}: {_short(text)}") from e
    except OSError as e:
        raise ManifestError(f"could not read manifest {uri}: {_short(str(e))}") from e
    return normalise(table, uri)


def _read(uri: str, fmt: str, filesystem: Any) -> pa.Table:
    import fsspec

    if filesystem is None:
        filesystem, path = fsspec.core.url_to_fs(uri)
    else:
        from .storage import strip

        path = strip(uri, filesystem)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with filesystem.open(path, "rb") as f:
            return pq.read_table(f)
    compression = "gzip" if path.endswith(".gz") else None
    with filesystem.open(path, "rb", compression=compression) as f:
        data = f.read()
    data.decode("utf-8")  # raise UnicodeDecodeError with a position rather than Arrow's vaguer error
    buf = pa.BufferReader(data)
    if fmt == "csv":
        import pyarrow.csv as pcsv

        # every column as text: ids like 007 must not become integers
        return pcsv.read_csv(buf, convert_options=pcsv.ConvertOptions(column_types=_all_strings(data)))
    import pyarrow.json as pjson

    return pjson.read_json(buf)


def _all_strings(csv_bytes: bytes) -> dict[str, pa.DataType]:
    header = csv_bytes.split(b"\n", 1)[0].decode("utf-8").strip().lstrip("\ufeff")
    import csv

    names = next(csv.reader([header]), [])
    return {name: pa.string() for name in names}


def normalise(table: pa.Table, uri: str) -> pa.Table:
    """Check columns and rows; return (id, audio, language) as strings, blank audio rows rejected."""
    columns = table.column_names
    if schema.AUDIO not in columns:
        raise ManifestError(
            f"column '{schema.AUDIO}' not found in {uri}; columns are: {', '.join(columns) or '(none)'}. "
            f"Add an '{schema.AUDIO}' column holding each file's path or URI."
        )
    if table.num_rows == 0:
        raise ManifestError(f"manifest {uri} has no rows")
    audio = pc.utf8_trim_whitespace(table[schema.AUDIO].cast(pa.string()))
    audio = _resolve_relative(audio, uri)
    blank = pc.or_kleene(pc.is_null(audio), pc.equal(audio, "")).fill_null(True)
    if pc.any(blank).as_py():
        rows = [i + _first_data_row(uri) for i in pc.indices_nonzero(blank).to_pylist()[:5]]
        raise ManifestError(
            f"manifest {uri} has {pc.sum(blank).as_py()} row(s) with an empty '{schema.AUDIO}' "
            f"(rows {', '.join(map(str, rows))}); remove them or fill in a path"
        )
    if schema.ID in columns:
        ids = table[schema.ID].cast(pa.string())
        missing = pc.or_kleene(pc.is_null(ids), pc.equal(ids, "")).fill_null(True)
        ids = pc.if_else(missing, pa.array([stable_id(a) for a in audio.to_pylist()]), ids)
    else:
        ids = pa.array([stable_id(a) for a in audio.to_pylist()], pa.string())
    counts = pc.value_counts(ids)
    dupes = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dupes):
        shown = ", ".join(repr(v) for v in dupes.field("values").to_pylist()[:5])
        raise ManifestError(
            f"manifest {uri} has {len(dupes)} duplicate id(s) ({shown}); ids must be unique because "
            "they key the output rows. Fix the ids, or drop the 'id' column to use a hash of 'audio' "
            "(then listing one file twice is also a duplicate)."
        )
    if schema.LANGUAGE in columns:
        lang = table[schema.LANGUAGE].cast(pa.string())
        lang = pc.if_else(pc.equal(pc.utf8_trim_whitespace(lang), ""), pa.scalar(None, pa.string()), lang)
    else:
        lang = pa.nulls(table.num_rows, pa.string())
    return pa.table({schema.ID: ids, schema.AUDIO: audio, schema.LANGUAGE: lang})


def _resolve_relative(audio: pa.ChunkedArray, manifest_uri: str) -> pa.ChunkedArray:
    """Relative paths are relative to the manifest's folder, so a manifest travels with its audio."""
    base = posixpath.dirname(manifest_uri)
    if "://" not in manifest_uri:
        import os

        base = os.path.dirname(os.path.abspath(manifest_uri))
    def resolve(a: str | None) -> str | None:
        if not a or "://" in a or a.startswith("/"):
            return a
        return posixpath.normpath(posixpath.join(base, a)) if "://" not in base else f"{base}/{a}"

    return pa.chunked_array([pa.array([resolve(a) for a in audio.to_pylist()], pa.string())])


def _first_data_row(uri: str) -> int:
    return 2 if uri.lower().endswith((".csv", ".csv.gz")) else 1  # 1-based line numbers a user can find


def _short(text: str) -> str:
    return " ".join(text.split())[:300]
