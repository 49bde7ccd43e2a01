"""The assemble stage: token rows of many files, in any order -> one output row per file, written to storage as
soon as the file is complete.

One actor sees every token row of the run (a pool of one), so it holds each file's chunks until the last one
arrives, merges them (merge.py), and writes the files completed by each batch as one part (parts.py). What it
returns to the driver is a receipt per row written: the run's progress, its summary, and its index. Nothing
waits for the whole run: a run killed at any point has kept every file whose part was written.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from .. import schema
from ..asr.chunking import Chunk
from ..asr.merge import ChunkTranscript, Word, merge_file
from ..errors import INTERNAL_ERROR, one_line, redact, row_error
from ..io.parts import PartWriter
from ..model.checkpoint import Checkpoint
from ..schema import present


def file_row(batch: dict[str, Any], checkpoint: Checkpoint, model_name: str, fingerprint: str,
             word_timestamps: bool = False) -> dict[str, Any]:
    """One file's token rows (columns of equal length, any order) -> its output row (with its `words` when
    `word_timestamps`)."""
    n = len(batch[schema.ID])
    file_id, audio = str(batch[schema.ID][0]), str(batch[schema.AUDIO][0])
    order = np.argsort(batch[schema.CHUNK_INDEX], kind="stable")
    failures = [batch[schema.ERROR][i] for i in order if present(batch[schema.ERROR][i])]
    if failures:
        return _carried(batch) | schema.error_row(file_id, audio, model_name, fingerprint, failures[0])
    indices = [int(batch[schema.CHUNK_INDEX][i]) for i in order]
    if indices != list(range(n)) or not bool(batch[schema.IS_LAST][order[-1]]):
        why = row_error(INTERNAL_ERROR, f"chunks missing (got {indices[:10]}...)")
        return _carried(batch) | schema.error_row(file_id, audio, model_name, fingerprint, why)
    chunks = [Chunk(int(batch[schema.CHUNK_INDEX][i]), int(batch[schema.START][i]), int(batch[schema.END][i]),
                    int(batch[schema.STRIDE_LEFT][i]), int(batch[schema.STRIDE_RIGHT][i]), bool(batch[schema.IS_LAST][i]))
              for i in order]
    transcript = merge_file(chunks, [_decoded(batch, i) for i in order], checkpoint.text)
    warnings = [batch[schema.WARNING][i] for i in order if present(batch[schema.WARNING][i])]
    return _carried(batch) | {
        schema.ID: file_id, schema.AUDIO: audio, **transcript.columns(word_timestamps), schema.MODEL: model_name,
        schema.FINGERPRINT: fingerprint, schema.STATUS: schema.STATUS_OK, schema.ERROR: warnings[0] if warnings else None,
    }


def _carried(batch: dict[str, Any]) -> dict[str, Any]:
    """The input row's other columns (transcribe_dataset), from whichever of the file's rows carries them."""
    blobs = [b for b in batch.get(schema.CARRY, ()) if isinstance(b, bytes) and b]  # nulls: None or NaN
    return {schema.CARRY: bytes(blobs[0])} if blobs else {}


def _decoded(batch: dict[str, Any], i: int) -> ChunkTranscript:
    """What the model stage decoded for token row `i`, back as the engine's result type."""
    segments = [(float(a), float(b), [int(t) for t in toks])
                for a, b, toks in zip(batch[schema.SEG_START][i], batch[schema.SEG_END][i], batch[schema.SEG_TOKENS][i])]
    words = [[Word(str(w["word"]), float(w["start"]), float(w["end"]), float(w["probability"]), int(w["tokens"]))
              for w in ws] for ws in batch[schema.SEG_WORDS][i]]
    language = batch[schema.LANGUAGE][i]
    prob = batch[schema.LANGUAGE_PROB][i]
    return ChunkTranscript(segments, language if present(language) else None, math.nan, math.nan,
                           language_prob=float(prob) if prob is not None else math.nan, words=words)


class Assembler:
    """map_batches callable for a pool of one actor: token rows in; output rows out (no `writer`), or, with a
    `writer`, the completed files written as a part and one receipt per file out (schema.RECEIPT_SCHEMA)."""

    def __init__(self, checkpoint: Checkpoint, model_name: str, fingerprint: str, writer: PartWriter | None = None,
                 word_timestamps: bool = False, carry: bool = False):
        self.word_timestamps = word_timestamps
        self.schema = schema.CARRIED_OUTPUT_SCHEMA if carry else schema.OUTPUT_SCHEMA  # carry: transcribe_dataset
        self.checkpoint = checkpoint
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.writer = writer
        self.pending: dict[str, dict[int, dict[str, Any]]] = {}  # file id -> chunk index -> token row

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        schema.require(batch, schema.ASSEMBLE_INPUT, "assemble")
        for i in range(len(batch[schema.ID])):
            row = {name: batch[name][i] for name in schema.ASSEMBLE_INPUT + (schema.CARRY,) if name in batch}
            # keyed by chunk index: a chunk that arrives twice (a retried task) counts once
            self.pending.setdefault(str(row[schema.ID]), {})[int(row[schema.CHUNK_INDEX])] = row
        rows = [self._merge(file_id) for file_id in [f for f, c in self.pending.items() if _complete(c)]]
        if self.writer is None:
            return pa.Table.from_pylist(rows, schema=self.schema)
        return self._write(rows)

    def _merge(self, file_id: str) -> dict[str, Any]:
        chunks = list(self.pending.pop(file_id).values())
        columns = {name: [c.get(name) for c in chunks] for name in schema.ASSEMBLE_INPUT + (schema.CARRY,)}
        return file_row(columns, self.checkpoint, self.model_name, self.fingerprint, self.word_timestamps)

    def _write(self, rows: list[dict[str, Any]]) -> pa.Table:
        part, failed = None, None
        if rows:
            try:
                part = self.writer.write(rows)
            except OSError as e:  # disk full, quota, permissions: the driver stops the run and says why
                failed = f"{type(e).__name__}: {one_line(redact(str(e)))}"
        return pa.Table.from_pylist(
            [{schema.ID: r[schema.ID], schema.STATUS: r[schema.STATUS], schema.DURATION_S: r[schema.DURATION_S],
              schema.ERROR: r[schema.ERROR], schema.PART: part, schema.WRITE_ERROR: failed} for r in rows],
            schema=schema.RECEIPT_SCHEMA,
        )


def _complete(chunks: dict[int, dict[str, Any]]) -> bool:
    """A file's chunks are all here: its last one has arrived, and every index before it."""
    last = [i for i, c in chunks.items() if bool(c[schema.IS_LAST])]
    return bool(last) and len(chunks) == last[0] + 1

