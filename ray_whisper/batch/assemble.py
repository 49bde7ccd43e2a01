"""Assembly: token rows of many files, in any order -> one output row per file, written to storage as soon as the
file is complete and a part is due.

One Assembler sees every token row of the run, so it holds each file's chunks until the last one arrives and
merges them (merge.py). In the batch job it runs on the driver (pipeline._collect), which feeds it the model
stage's rows: completed files are written as one part (parts.py) when `flush_interval_s` has passed since the
last part or `flush_chunks` token rows have come in, and whatever is finished at the end of the stream or at an
interrupt. Its state (files waiting for a chunk) lives in the driver, the one process a run cannot lose without
stopping, so no worker node holds anything a rerun would redo. It returns a receipt per row written: the run's
progress, its summary, and its index. For a lazy Dataset (no writer: build_dataset, transcribe_dataset) it is a
map_batches stage on a pool of one actor that returns the completed files' rows.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

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
    """Token rows in; output rows out. Called as a map_batches callable (no `writer`), it returns the files each
    batch completed. With a `writer` (the driver of the batch job), `add` token rows, and `flush` when `due`:
    the completed files are written as one part and one receipt per file comes back (schema.RECEIPT_SCHEMA)."""

    def __init__(self, checkpoint: Checkpoint, model_name: str, fingerprint: str, writer: PartWriter | None = None,
                 word_timestamps: bool = False, carry: bool = False, flush_interval_s: float = 30.0,
                 flush_chunks: int = 64, clock: Callable[[], float] = time.monotonic):
        self.word_timestamps = word_timestamps
        self.schema = schema.CARRIED_OUTPUT_SCHEMA if carry else schema.OUTPUT_SCHEMA  # carry: transcribe_dataset
        self.checkpoint = checkpoint
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.writer = writer
        self.flush_interval_s = flush_interval_s
        self.flush_chunks = flush_chunks
        self.clock = clock
        self.pending: dict[str, dict[int, dict[str, Any]]] = {}  # file id -> chunk index -> token row
        self.finished: list[dict[str, Any]] = []  # output rows not yet written
        self.chunks = 0  # token rows in since the last part
        self.last_part = clock()
        self.first_finished: float | None = None  # when the run's first file was finished

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self.add(batch)
        rows, self.finished = self.finished, []
        return pa.Table.from_pylist(rows, schema=self.schema)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Take token rows (columns of equal length); the files they complete are merged into `finished`."""
        schema.require(batch, schema.ASSEMBLE_INPUT, "assemble")
        n = len(batch[schema.ID])
        for i in range(n):
            row = {name: batch[name][i] for name in schema.ASSEMBLE_INPUT + (schema.CARRY,) if name in batch}
            # keyed by chunk index: a chunk that arrives twice (a retried task) counts once
            self.pending.setdefault(str(row[schema.ID]), {})[int(row[schema.CHUNK_INDEX])] = row
        self.chunks += n
        self.finished += [self._merge(file_id) for file_id in [f for f, c in self.pending.items() if _complete(c)]]
        if self.finished and self.first_finished is None:
            self.first_finished = self.last_part = self.clock()  # the first part is due EARLY_MIN_S later

    def interval_s(self) -> float:
        """The flush interval now: `flush_interval_s`, shorter early in a run: a tenth of the time files have
        been finishing (at least EARLY_MIN_S). A run of a few minutes, killed at 70%, then keeps more than half
        its files, where a fixed 30 s would lose most of a short run; a long run writes every `flush_interval_s`."""
        if self.first_finished is None:
            return self.flush_interval_s
        early = max(EARLY_MIN_S, EARLY_SHARE * (self.clock() - self.first_finished))
        return min(self.flush_interval_s, early)

    def wait_s(self) -> float:
        """Seconds until a part is due by time (the flush interval when nothing is finished)."""
        if not self.finished:
            return self.interval_s()
        return max(0.0, self.interval_s() - (self.clock() - self.last_part))

    def due(self) -> bool:
        """Finished files are waiting, and the flush interval has passed or `flush_chunks` rows came in."""
        return bool(self.finished) and (self.chunks >= self.flush_chunks or self.wait_s() <= 0)

    def flush(self) -> pa.Table:
        """Write the finished files as one part; their receipts (none when nothing was finished). A store that
        refuses the part (disk full, quota, permissions) gives receipts with `write_error` set: the driver
        stops the run and says why."""
        rows, part, failed = self.finished, None, None
        if rows:
            try:
                part = self.writer.write(rows)
            except OSError as e:
                failed = f"{type(e).__name__}: {one_line(redact(str(e)))}"
        # cleared once written (or refused): a write cut short by Ctrl-C leaves the rows for the next flush, which
        # may write them twice (the next run's commit keeps one): nothing finished is left out
        self.finished, self.chunks, self.last_part = [], 0, self.clock()
        return pa.Table.from_pylist(
            [{schema.ID: r[schema.ID], schema.STATUS: r[schema.STATUS], schema.DURATION_S: r[schema.DURATION_S],
              schema.ERROR: r[schema.ERROR], schema.PART: part, schema.WRITE_ERROR: failed} for r in rows],
            schema=schema.RECEIPT_SCHEMA,
        )

    def _merge(self, file_id: str) -> dict[str, Any]:
        chunks = list(self.pending.pop(file_id).values())
        columns = {name: [c.get(name) for c in chunks] for name in schema.ASSEMBLE_INPUT + (schema.CARRY,)}
        return file_row(columns, self.checkpoint, self.model_name, self.fingerprint, self.word_timestamps)


EARLY_SHARE = 0.1  # early in a run, a part is due after this share of the time since the first file finished
EARLY_MIN_S = 1.0  # ...but not more often than this


def _complete(chunks: dict[int, dict[str, Any]]) -> bool:
    """A file's chunks are all here: its last one has arrived, and every index before it."""
    last = [i for i, c in chunks.items() if bool(c[schema.IS_LAST])]
    return bool(last) and len(chunks) == last[0] + 1

