"""Datasets in, Datasets out: the batch job's stages applied to a Ray Dataset the user already has.

    ds = ray.data.read_parquet("s3://calls/meta/").filter(lambda r: r["day"] == "2026-12-01")
    out = ray_whisper.transcribe_dataset(ds, audio_column="uri", id_column="call_id")
    out.write_parquet("s3://calls/transcripts/2026-12-01/")

The audio column holds, per row, a URI (fetched as a manifest's are), the file's bytes (`read_binary_files`),
a Hugging Face audio value ({"bytes", "path"} undecoded, or {"array", "sampling_rate"} decoded), or an array of
samples with a `sampling_rate_column`. The result is lazy: one output row (schema.OUTPUT_SCHEMA) per input
row, error rows included, with the input's other columns carried through beside them (a column named like an
output column comes back as `input_<name>`). Nothing runs until it is consumed.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import uuid
import wave
from typing import Any

import numpy as np
import pyarrow as pa

from .. import schema
from ..config import TranscribeOptions
from ..errors import ConfigError
from ..io.manifest import stable_id
from .cluster import connect
from .pipeline import Prepared, prepare_model, stages


def transcribe_dataset(ds: Any, audio_column: str = "audio", id_column: str | None = None,
                       language_column: str | None = None, prompt_column: str | None = None,
                       sampling_rate_column: str | None = None, options: TranscribeOptions | None = None,
                       **overrides: Any) -> Any:
    """The lazy Dataset of output rows for the audio in `ds`'s `audio_column`, the other columns carried
    through. Options as for `transcribe` (a TranscribeOptions, keywords, or both), checked here, on the driver.
    Ids come from `id_column`, else from the audio (a URI's as a manifest's; in-memory audio: a hash of it and
    a random suffix, so that the same audio twice is still two rows)."""
    options = (options or TranscribeOptions()).replace(**overrides)
    columns = ds.columns() or []
    named = {"audio_column": audio_column, "id_column": id_column, "language_column": language_column,
             "prompt_column": prompt_column, "sampling_rate_column": sampling_rate_column}
    missing = [f"{k}={v!r}" for k, v in named.items() if v is not None and v not in columns]
    if missing:
        raise ConfigError(f"transcribe_dataset: no column {', '.join(missing)} in the dataset; its columns are: "
                          f"{', '.join(columns)}")
    checkpoint, storage_options, detect = prepare_model(options)
    connect(options.run.dashboard)
    used = {v for v in named.values() if v}
    files = ds.map_batches(
        _as_files,
        fn_kwargs={"columns": named, "carried": [c for c in columns if c not in used]},
        batch_format="pandas",
        batch_size=options.resources.files_per_task,
    )
    prepared = Prepared(None, checkpoint, storage_options, detect)
    return stages(files, prepared, options, writer=None, carry=True).map_batches(_unpacked, batch_format="pyarrow")


def _as_files(batch: Any, columns: dict[str, str | None], carried: list[str]) -> pa.Table:
    """Input rows -> manifest rows with the audio in memory where it was given so, the rest pickled to ride
    along (schema.CARRY)."""
    rows = batch.to_dict("records")
    out: dict[str, list[Any]] = {name: [] for name in
                                 (schema.ID, schema.AUDIO, schema.LANGUAGE, schema.PROMPT, schema.AUDIO_BYTES, schema.CARRY)}
    for row in rows:
        rate = row.get(columns["sampling_rate_column"]) if columns["sampling_rate_column"] else None
        uri, data = _audio(row[columns["audio_column"]], rate)
        given = row.get(columns["id_column"]) if columns["id_column"] else None
        out[schema.ID].append(str(given) if given is not None else
                              stable_id(uri) if data is None else _memory_id(data))
        out[schema.AUDIO].append(uri)
        for name, column in ((schema.LANGUAGE, columns["language_column"]), (schema.PROMPT, columns["prompt_column"])):
            value = row.get(column) if column else None
            out[name].append(value if schema.present(value) else None)  # null: None or NaN
        out[schema.AUDIO_BYTES].append(data)
        out[schema.CARRY].append(pickle.dumps({c: row[c] for c in carried}))
    return pa.table({name: pa.array(values, type=pa.large_binary() if name in (schema.AUDIO_BYTES, schema.CARRY)
                                    else pa.string()) for name, values in out.items()})


def _audio(value: Any, rate: Any) -> tuple[str, bytes | None]:
    """(the audio as the output's `audio` column shows it, its bytes when given in memory)."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return f"<{len(data)} bytes>", data
    if isinstance(value, dict):
        if value.get("bytes"):
            return str(value.get("path") or f"<{len(value['bytes'])} bytes>"), bytes(value["bytes"])
        if value.get("array") is not None:
            return _audio(np.asarray(value["array"]), value.get("sampling_rate"))
        if value.get("path"):
            return str(value["path"]), None
    if isinstance(value, (np.ndarray, list)):
        samples = np.asarray(value, dtype=np.float32)
        if rate is None:
            raise ConfigError("transcribe_dataset: the audio column holds samples without their sampling rate: "
                              "give sampling_rate_column= (or {'array', 'sampling_rate'} values)")
        return f"<{samples.size} samples at {int(rate)} Hz>", _wav(samples, int(rate))
    raise ConfigError(f"transcribe_dataset: cannot read audio from a {type(value).__name__}: give URIs, bytes, "
                      "{'bytes', 'path'}, {'array', 'sampling_rate'} or arrays with sampling_rate_column=")


def _wav(samples: np.ndarray, rate: int) -> bytes:
    """Samples as 16-bit PCM WAV bytes: the CPU stage decodes (and resamples) them as any file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples.reshape(-1), -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def _memory_id(data: bytes) -> str:
    return f"{hashlib.sha1(data).hexdigest()[:16]}-{uuid.uuid4().hex[:8]}"


def _unpacked(batch: pa.Table) -> pa.Table:
    """Output rows with the input's other columns back beside them, in place of their pickle."""
    carried = [pickle.loads(b) if b else {} for b in batch[schema.CARRY].to_pylist()]
    table = batch.drop_columns([schema.CARRY])
    for name in dict.fromkeys(k for row in carried for k in row):
        column = f"input_{name}" if name in table.column_names else name
        table = table.append_column(column, pa.array([row.get(name) for row in carried]))
    return table
