"""The CPU stage: manifest rows -> chunk rows (fetch, decode, cut into chunks, log-mel features).

One manifest row becomes one row per chunk, or a single error row when the file cannot be used; the error
row travels through the model stage untouched so that every manifest row reaches the output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from ..asr import features
from .. import schema
from ..io import storage
from ..io.audio import decode_stream, open_audio
from ..asr.chunking import Chunk, ChunkGeometry, is_silent, iter_chunks
from ..config import StorageOptions
from ..errors import INTERNAL_ERROR, TRUNCATED, DecodeError, FileError, row_error

CHUNKS_PER_BLOCK = 16  # about 8 MB of float16 features per yielded block
FEATURE_GROUP = 8  # chunks whose log-mel is computed together


class _Collector:
    """Accumulates chunk rows and hands them out as Arrow tables of bounded size."""

    def __init__(self) -> None:
        self.rows: dict[str, list[Any]] = {name: [] for name in schema.CHUNK_SCHEMA.names}

    def add(self, **row: Any) -> None:
        for name in schema.CHUNK_SCHEMA.names:
            self.rows[name].append(row.get(name))

    def __len__(self) -> int:
        return len(self.rows[schema.ID])

    def take(self) -> pa.Table:
        table = pa.table(self.rows, schema=schema.CHUNK_SCHEMA)
        self.rows = {name: [] for name in schema.CHUNK_SCHEMA.names}
        return table


def _safe_pieces(pieces: Iterator[np.ndarray], notes: list[str]) -> Iterator[np.ndarray]:
    """Pass decoded pieces on; a stream that breaks after some audio ends there, with a note kept.

    A truncated upload keeps the transcript of everything that decoded (status ok, the note as its warning);
    a file that yields no audio at all still fails as a whole.
    """
    got_audio = False
    try:
        for p in pieces:
            got_audio = got_audio or p.size > 0
            yield p
    except DecodeError as e:
        if not got_audio:
            raise
        notes.append(f"{TRUNCATED}: {e}")


def file_to_chunks(
    row: dict[str, Any], geom: ChunkGeometry, n_mels: int, filesystem: Any, out: _Collector, detect: bool = False,
    audio_track: int | None = None,
) -> Iterator[pa.Table]:
    """Add one file's chunk rows (or its error row) to `out`, yielding full blocks as they fill up. With
    `detect` (a multilingual model, the row's language unknown), the file's first chunk with sound is its
    detection chunk, and the rows after it carry its features (schema.DETECT_FEATURES). `audio_track`: the
    file's audio track to transcribe (None: its default); the last chunk row carries the file's warnings
    (tracks left out, a silent track, a truncated stream), joined by "; "."""
    detection: dict[str, Any] = {"index": -1, "features": b""}
    detect = detect and not row.get(schema.LANGUAGE)
    # the URI without its secrets travels on (to the output); the real one is only used to fetch
    base = {schema.ID: row[schema.ID], schema.AUDIO: storage.public_uri(row[schema.AUDIO]),
            schema.LANGUAGE: row.get(schema.LANGUAGE), schema.PROMPT: row.get(schema.PROMPT)}
    carry = row.get(schema.CARRY)  # transcribe_dataset's other columns: on the last row only
    notes: list[str] = []
    pending: list[tuple[Chunk, np.ndarray]] = []
    emitted = 0

    def flush() -> None:
        nonlocal emitted
        audible = [not is_silent(a) for _, a in pending]
        feats = iter(features.log_mel([a for (_, a), keep in zip(pending, audible) if keep], n_mels))
        for (c, _), keep in zip(pending, audible):
            blob = features.to_bytes(next(feats)) if keep else b""  # empty: silent, not decoded
            carried = detection["features"]
            if detect and keep and detection["index"] < 0:
                detection.update(index=c.index, features=blob)
            out.add(
                **base, chunk_index=c.index, is_last=c.is_last, start=c.start, end=c.end,
                stride_left=c.stride_left, stride_right=c.stride_right, features=blob,
                warning="; ".join(notes) if (c.is_last and notes) else None,
                detect_index=detection["index"], detect_features=carried, carry=carry if c.is_last else None,
            )
        emitted += len(pending)
        pending.clear()

    try:
        with _source(row, filesystem) as f:
            pieces = _safe_pieces(decode_stream(f, track=audio_track, notes=notes), notes)
            for chunk, samples in iter_chunks(pieces, geom):
                pending.append((chunk, samples))
                if len(pending) >= FEATURE_GROUP:
                    flush()
                    if len(out) >= CHUNKS_PER_BLOCK:
                        yield out.take()
        if emitted + len(pending) == 0:
            raise DecodeError("no audio samples decoded")
        flush()
    except FileError as e:
        _add_error(out, base, row_error(e.kind, e), emitted, carry)
    except Exception as e:  # anything unexpected in one file stays that file's problem
        _add_error(out, base, row_error(INTERNAL_ERROR, f"{type(e).__name__}: {e}"), emitted, carry)


def _source(row: dict[str, Any], filesystem: Any) -> Any:
    """The file to decode: its bytes when the row holds them (transcribe_dataset), else fetched by URI."""
    data = row.get(schema.AUDIO_BYTES)
    return contextlib.nullcontext(data) if data else open_audio(row[schema.AUDIO], filesystem)


def _add_error(out: _Collector, base: dict[str, Any], error: str, emitted: int, carry: bytes | None) -> None:
    # chunk_index after any chunks already emitted, so the error row never collides with one of them
    out.add(**base, chunk_index=emitted, is_last=True, start=0, end=0, stride_left=0, stride_right=0,
            features=b"", error=error, detect_index=-1, detect_features=b"", carry=carry)


def chunk_batch(
    batch: pa.Table, geom: ChunkGeometry, n_mels: int, storage_options: StorageOptions | None = None,
    detect_language: bool = False, audio_track: int | None = None,
) -> Iterator[pa.Table]:
    """map_batches generator: a few manifest rows in, blocks of chunk rows out as they are ready.
    `detect_language`: the model detects each file's language once; `audio_track`: which audio track of each
    file is transcribed, None for its default (see file_to_chunks)."""
    schema.require(batch.column_names, (schema.ID, schema.AUDIO), "CPU (decode)")
    out = _Collector()
    for row in batch.to_pylist():
        fs = storage.filesystem(row[schema.AUDIO], storage_options)
        yield from file_to_chunks(row, geom, n_mels, fs, out, detect_language, audio_track)
    if len(out):
        yield out.take()
