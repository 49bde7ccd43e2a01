"""The assemble stage: token rows of many files, in any order -> one output row per file, written to storage as
soon as the file is complete.

One actor sees every token row of the run (a pool of one), so it holds each file's chunks until the last one
arrives, merges them (merge.py), and writes the files completed by each batch as one part (parts.py). What it
returns to the driver is a receipt per row written: the run's progress, its summary, and its index. Nothing
waits for the whole run: a run killed at any point has kept every file whose part was written.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import tokenizers

from .. import schema
from ..constants import SAMPLE_RATE
from ..errors import INTERNAL_ERROR, one_line, redact, row_error
from ..asr.merge import ChunkResult, merge_chunks, to_text
from ..io.parts import PartWriter
from ..asr.tokens import vote_language


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> tokenizers.Tokenizer:
    # the bare `tokenizers` library: this stage never imports transformers (seconds per process)
    return tokenizers.Tokenizer.from_str(tokenizer_json)


def error_row(file_id: str, audio: str, model_name: str, fingerprint: str, error: str) -> dict[str, Any]:
    """The output row of a file that failed: `error` is "<kind>: <reason>"."""
    return {
        schema.ID: file_id, schema.AUDIO: audio, schema.TEXT: None, schema.SEGMENTS: None, schema.WORDS: None,
        schema.LANGUAGE: None, schema.LANGUAGE_PROBABILITY: None, schema.DURATION_S: None, schema.NUM_CHUNKS: 0, schema.MODEL: model_name, schema.FINGERPRINT: fingerprint,
        schema.STATUS: schema.STATUS_ERROR, schema.ERROR: error,
    }


def file_row(batch: dict[str, Any], tokenizer_json: str, model_name: str, fingerprint: str,
             word_timestamps: bool = False) -> dict[str, Any]:
    """One file's token rows (columns of equal length, any order) -> its output row (with its `words` when
    `word_timestamps`)."""
    n = len(batch[schema.ID])
    file_id, audio = str(batch[schema.ID][0]), str(batch[schema.AUDIO][0])
    order = np.argsort(batch[schema.CHUNK_INDEX], kind="stable")
    failures = [batch[schema.ERROR][i] for i in order if _present(batch[schema.ERROR][i])]
    if failures:
        return error_row(file_id, audio, model_name, fingerprint, failures[0])
    indices = [int(batch[schema.CHUNK_INDEX][i]) for i in order]
    if indices != list(range(n)) or not bool(batch[schema.IS_LAST][order[-1]]):
        why = row_error(INTERNAL_ERROR, f"chunks missing (got {indices[:10]}...)")
        return error_row(file_id, audio, model_name, fingerprint, why)
    chunks = [
        ChunkResult.from_samples(
            batch[schema.CHUNK_INDEX][i], int(batch[schema.START][i]), int(batch[schema.END][i]),
            int(batch[schema.STRIDE_LEFT][i]), int(batch[schema.STRIDE_RIGHT][i]),
            zip(batch[schema.SEG_START][i], batch[schema.SEG_END][i], batch[schema.SEG_TOKENS][i]),
            batch[schema.LANGUAGE][i] if _present(batch[schema.LANGUAGE][i]) else None,
            batch[schema.SEG_WORDS][i],
        )
        for i in order
    ]
    tok = _tokenizer(tokenizer_json)
    text, segments = to_text(merge_chunks(chunks), lambda ids: tok.decode(list(ids), skip_special_tokens=True))
    warnings = [batch[schema.WARNING][i] for i in order if _present(batch[schema.WARNING][i])]
    language = vote_language([x for x in batch[schema.LANGUAGE] if _present(x)])
    probs = [float(p) for x, p in zip(batch[schema.LANGUAGE], batch[schema.LANGUAGE_PROB])
             if x == language and p is not None and math.isfinite(float(p))]
    return {
        schema.ID: file_id, schema.AUDIO: audio, schema.TEXT: text,
        schema.SEGMENTS: [{"start": s.start, "end": s.end, "text": s.text, "language": s.language} for s in segments],
        schema.WORDS: [{"word": w.word, "start": w.start, "end": w.end, "probability": round(w.probability, 4)}
                       for s in segments for w in s.words] if word_timestamps else None,
        schema.LANGUAGE: language,
        schema.LANGUAGE_PROBABILITY: round(sum(probs) / len(probs), 4) if probs else None,
        schema.DURATION_S: round(max(int(x) for x in batch[schema.END]) / SAMPLE_RATE, 3),
        schema.NUM_CHUNKS: n, schema.MODEL: model_name, schema.FINGERPRINT: fingerprint,
        schema.STATUS: schema.STATUS_OK, schema.ERROR: warnings[0] if warnings else None,
    }


class Assembler:
    """map_batches callable for a pool of one actor: token rows in; output rows out (no `writer`), or, with a
    `writer`, the completed files written as a part and one receipt per file out (schema.RECEIPT_SCHEMA)."""

    def __init__(self, tokenizer_json: str, model_name: str, fingerprint: str, writer: PartWriter | None = None,
                 word_timestamps: bool = False):
        self.word_timestamps = word_timestamps
        self.tokenizer_json = tokenizer_json
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.writer = writer
        self.pending: dict[str, dict[int, dict[str, Any]]] = {}  # file id -> chunk index -> token row

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        schema.require(batch, schema.ASSEMBLE_INPUT, "assemble")
        for i in range(len(batch[schema.ID])):
            row = {name: batch[name][i] for name in schema.ASSEMBLE_INPUT}
            # keyed by chunk index: a chunk that arrives twice (a retried task) counts once
            self.pending.setdefault(str(row[schema.ID]), {})[int(row[schema.CHUNK_INDEX])] = row
        rows = [self._merge(file_id) for file_id in [f for f, c in self.pending.items() if _complete(c)]]
        if self.writer is None:
            return pa.Table.from_pylist(rows, schema=schema.OUTPUT_SCHEMA)
        return self._write(rows)

    def _merge(self, file_id: str) -> dict[str, Any]:
        chunks = list(self.pending.pop(file_id).values())
        columns = {name: [c[name] for c in chunks] for name in schema.ASSEMBLE_INPUT}
        return file_row(columns, self.tokenizer_json, self.model_name, self.fingerprint, self.word_timestamps)

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


def _present(value: Any) -> bool:
    """A set string; null strings can arrive as None or NaN depending on the batch format."""
    return isinstance(value, str) and bool(value)
