"""Read and check the manifest on the driver, before any worker starts.

A manifest is CSV, JSON Lines or Parquet (chosen by extension) with a required `audio` column and optional
`id`, `language` and `prompt` columns. It may also be a listing of audio files instead of a file:

- a folder or prefix ending in `/` (`s3://bucket/calls/`, `data/calls/`): every file below it, at any
  depth, whose extension is a known audio/video one (AUDIO_EXTENSIONS; other files are skipped);
- a glob (`s3://bucket/calls/**/*.mp3`, `data/*/*.wav`; `*`, `?`, `[...]`, `**` for any depth): every
  file that matches, whatever its extension.

A listing's rows are sorted by key; `audio` is each file's full URI (a local path for local files), `id` is
its path relative to the listing's root (the folder/prefix, or the part of a glob before its first
wildcard), e.g. `2024/01/call-17.mp3`: readable, unique, and stable across runs as long as the same
root is listed. `language` and `prompt` are empty. Problems are ManifestErrors whose message names the file and what to fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import re
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from .. import schema
from ..errors import ManifestError, redact
from .storage import describe_error, protocol, stable_uri, strip

FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet",
           ".pq": "parquet"}
LISTING = "listing"  # manifest_format of a folder/prefix ending in "/" or a glob
# what a folder/prefix listing keeps: extensions PyAV decodes that are audio or carry an audio track
AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aif", ".aiff",
    ".amr", ".ac3", ".caf", ".au", ".spx", ".mka", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".3gp",
)
_GLOB = re.compile(r"[*?\[]")


def is_listing(uri: str) -> bool:
    """A folder/prefix ending in "/" or a glob: the audio files it names rather than a manifest file.
    HTTP(S) URLs are never listings (they cannot be listed, and '?' starts their query)."""
    if protocol(uri) in ("http", "https"):
        return False
    return uri.endswith("/") or bool(_GLOB.search(uri))


def manifest_format(uri: str) -> str:
    """csv, json or parquet by extension; LISTING for a folder/prefix ending in "/" or a glob."""
    if is_listing(uri):
        return LISTING
    return _file_format(uri)


def _file_format(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/")).lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            return FORMATS[ext]
    raise ManifestError(
        f"cannot tell the format of manifest {uri}: name it .csv, .jsonl or .parquet "
        f"(known extensions: {', '.join(sorted(FORMATS))}); to transcribe every audio file under a folder or "
        f"prefix, end it with '/' ({uri.rstrip('/')}/), or give a quoted glob such as '{uri.rstrip('/')}/**/*.mp3'"
    )


def stable_id(audio: str) -> str:
    """The default id: the first 16 hex digits of the SHA-1 of the audio URI without its password and signing
    parameters (storage.stable_uri), stable across runs and re-signed URLs; URLs that differ in any other
    parameter (?file=a.mp3, ?file=b.mp3) keep different ids, though the stored URI masks those values."""
    return hashlib.sha1(stable_uri(audio).encode("utf-8")).hexdigest()[:16]


def read_manifest(uri: str, filesystem: Any = None) -> pa.Table:
    """Read, check and normalise a manifest (a file, or a listing: see the module doc) into a table with
    string columns id, audio, language, prompt."""
    fmt = manifest_format(uri)
    if fmt == LISTING:
        if filesystem is None:
            filesystem = fsspec.core.url_to_fs(uri)[0]
        literal = _literal_manifest_file(uri, filesystem)
        if literal is None:
            return _list_audio(uri, filesystem)
        fmt = literal  # a manifest file whose name holds [, ? or *
    try:
        table = _read(uri, fmt, filesystem)
    except ManifestError:
        raise
    except FileNotFoundError as e:
        raise ManifestError(f"manifest not found: {uri}") from e
    except PermissionError as e:
        raise ManifestError(f"manifest not readable (access denied; check the credentials): {uri}") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest {uri} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from e
    except pa.ArrowInvalid as e:
        text = str(e)
        if "UTF8" in text or "utf-8" in text.lower() or "utf8" in text.lower():
            raise ManifestError(f"manifest {uri} is not UTF-8 text; re-save it as UTF-8 ({_short(text)})") from e
        raise ManifestError(f"manifest {uri} is not valid {fmt.upper()}: {_short(text)}") from e
    except OSError as e:
        raise ManifestError(f"could not read manifest {uri}: {_short(str(e))}") from e
    except Exception as e:  # store clients raise their own types (botocore's EndpointConnectionError...)
        raise ManifestError(f"could not read manifest {uri}: {describe_error(e, uri)}") from e
    return normalise(table, uri)


def _literal_manifest_file(uri: str, filesystem: Any) -> str | None:
    """The format of `uri` when it names an existing manifest file despite looking like a glob."""
    if uri.endswith("/"):
        return None
    try:
        fmt = _file_format(uri)
    except ManifestError:
        return None
    try:
        return fmt if filesystem.isfile(strip(uri, filesystem)) else None
    except Exception:
        return None


def _list_audio(uri: str, filesystem: Any) -> pa.Table:
    """The rows of a folder/prefix or glob listing: sorted files, id = path relative to the root."""
    local = protocol(uri) == "file"
    glob = bool(_GLOB.search(uri))
    path = strip(uri, filesystem)
    if glob:
        parts = path.split("/")
        first = next(i for i, part in enumerate(parts) if _GLOB.search(part))
        root = "/".join(parts[:first])
    else:
        root = path.rstrip("/")
    try:
        if glob:
            found = filesystem.glob(path, detail=True)
        else:
            found = filesystem.find(root, detail=True)
    except FileNotFoundError as e:
        raise ManifestError(f"cannot list {uri}: the bucket or folder does not exist") from e
    except PermissionError as e:
        raise ManifestError(f"cannot list {uri}: access denied (listing needs s3:ListBucket or the like)") from e
    except Exception as e:
        raise ManifestError(f"cannot list {uri}: {describe_error(e, uri)}") from e
    files = sorted(name for name, info in found.items() if info.get("type") == "file")
    skipped = 0
    if not glob:
        audio = [f for f in files if f.lower().endswith(AUDIO_EXTENSIONS)]
        skipped = len(files) - len(audio)
        files = audio
    if not files and glob:
        raise ManifestError(f"no files match the manifest glob {uri}")
    if not files:
        why = f"; {skipped} file(s) without an audio extension were skipped (a glob such as " \
              f"'{uri}**/*.ext' takes any extension)" if skipped else ""
        raise ManifestError(f"no audio files under {uri} (it is empty or does not exist{why})")
    prefix = root.rstrip("/") + "/" if root else ""
    ids = [f.removeprefix(prefix) for f in files]
    if local:
        audio_uris = files
    else:
        scheme = protocol(uri)
        audio_uris = [f"{scheme}://{f.lstrip('/')}" for f in files]
    return pa.table(
        {
            schema.ID: pa.array(ids, pa.string()),
            schema.AUDIO: pa.array(audio_uris, pa.string()),
            schema.LANGUAGE: pa.nulls(len(files), pa.string()),
            schema.PROMPT: pa.nulls(len(files), pa.string()),
        }
    )


def _read(uri: str, fmt: str, filesystem: Any) -> pa.Table:
    if filesystem is None:
        filesystem, path = fsspec.core.url_to_fs(uri)
    else:
        path = strip(uri, filesystem)
    if fmt == "parquet":
        with filesystem.open(path, "rb") as f:
            return pq.read_table(f)
    compression = "gzip" if path.endswith(".gz") else None
    with filesystem.open(path, "rb", compression=compression) as f:
        data = f.read()
    data.decode("utf-8")  # raise UnicodeDecodeError with a position rather than Arrow's vaguer error
    buf = pa.BufferReader(data)
    if fmt == "csv":
        delimiter = _delimiter(data)
        # every column as text: ids like 007 must not become integers
        return pcsv.read_csv(buf, parse_options=pcsv.ParseOptions(delimiter=delimiter),
                             convert_options=pcsv.ConvertOptions(column_types=_all_strings(data, delimiter)))
    _check_json_lines(data, uri)
    return pjson.read_json(buf)


def _delimiter(csv_bytes: bytes) -> str:
    """Tab when the header line has tabs and no commas (a TSV, whatever its name), else comma."""
    header = csv_bytes.split(b"\n", 1)[0]
    return "\t" if b"\t" in header and b"," not in header else ","


def _all_strings(csv_bytes: bytes, delimiter: str) -> dict[str, pa.DataType]:
    header = csv_bytes.split(b"\n", 1)[0].decode("utf-8").strip().lstrip("\ufeff")
    names = next(csv.reader([header], delimiter=delimiter), [])
    return {name: pa.string() for name in names}


def _check_json_lines(data: bytes, uri: str) -> None:
    """Name the first line that is not a JSON object, counting lines from 1 as the CSV messages do."""
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest {uri} line {number} is not valid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(value, dict):
            raise ManifestError(f"manifest {uri} line {number} is not a JSON object such as {{\"audio\": \"a.wav\"}}")


def normalise(table: pa.Table, uri: str) -> pa.Table:
    """Check columns and rows; return (id, audio, language, prompt) as strings, blank audio rows rejected."""
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
    return pa.table({schema.ID: ids, schema.AUDIO: audio, schema.LANGUAGE: _optional_text(table, schema.LANGUAGE),
                     schema.PROMPT: _optional_text(table, schema.PROMPT)})


def _optional_text(table: pa.Table, column: str) -> pa.ChunkedArray | pa.Array:
    """An optional text column: blank cells are null, a missing column is all null."""
    if column not in table.column_names:
        return pa.nulls(table.num_rows, pa.string())
    values = table[column].cast(pa.string())
    return pc.if_else(pc.equal(pc.utf8_trim_whitespace(values), ""), pa.scalar(None, pa.string()), values)


def _resolve_relative(audio: pa.ChunkedArray, manifest_uri: str) -> pa.ChunkedArray:
    """Relative paths are relative to the manifest's folder, so a manifest travels with its audio: next
    to s3://bucket/lists/m.csv, `a.wav` is s3://bucket/lists/a.wav and `../audio/b.wav` s3://bucket/audio/b.wav."""
    base = posixpath.dirname(manifest_uri)
    if "://" not in manifest_uri:
        base = os.path.dirname(os.path.abspath(manifest_uri))

    def resolve(a: str | None) -> str | None:
        if not a or "://" in a or a.startswith("/"):
            return a
        if "://" not in base:
            return posixpath.normpath(posixpath.join(base, a))
        scheme, rest = base.split("://", 1)  # rest starts with the bucket: keep it, normalise the key
        bucket, _, key = rest.partition("/")
        joined = posixpath.normpath(posixpath.join("/", key, a)).lstrip("/")
        return f"{scheme}://{bucket}/{joined}"

    return pa.chunked_array([pa.array([resolve(a) for a in audio.to_pylist()], pa.string())])


def _first_data_row(uri: str) -> int:
    csv_like = uri.lower().endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz"))
    return 2 if csv_like else 1  # 1-based line numbers a user can find: a CSV's first line is its header


def _short(text: str) -> str:
    return redact(" ".join(text.split()))[:300]
