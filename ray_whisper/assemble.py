"""The merge stage: all token rows of one file -> its output row (text, timed segments, status)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import tokenizers

from . import schema
from .constants import SAMPLE_RATE
from .errors import INTERNAL_ERROR, row_error
from .merge import ChunkResult, merge_chunks, to_text
from .tokens import vote_language


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> tokenizers.Tokenizer:
    # the bare `tokenizers` library: merge workers never import transformers (seconds per process)
    return tokenizers.Tokenizer.from_str(tokenizer_json)


def error_row(file_id: str, audio: str, model_name: str, error: str) -> dict[str, Any]:
    """The output row of a file that failed: `error` is "<kind>: <reason>"."""
    return {
        schema.ID: file_id, schema.AUDIO: audio, schema.TEXT: None, schema.SEGMENTS: None, schema.LANGUAGE: None,
        schema.DURATION_S: None, schema.NUM_CHUNKS: 0, schema.MODEL: model_name, schema.STATUS: schema.STATUS_ERROR,
        schema.ERROR: error,
    }


def merge_file(batch: dict[str, np.ndarray], tokenizer_json: str, model_name: str) -> pa.Table:
    """map_groups function: one file's token rows (any order) -> one output row.

    `tokenizer_json` is the model's serialized fast tokenizer, used to turn merged token ids into text."""
    schema.require(batch, schema.ASSEMBLE_INPUT, "merge")
    return pa.Table.from_pylist([file_row(batch, tokenizer_json, model_name)], schema=schema.OUTPUT_SCHEMA)


def file_row(batch: dict[str, Any], tokenizer_json: str, model_name: str) -> dict[str, Any]:
    """One file's token rows (columns of equal length, any order) -> its output row."""
    n = len(batch[schema.ID])
    file_id, audio = str(batch[schema.ID][0]), str(batch[schema.AUDIO][0])
    order = np.argsort(batch[schema.CHUNK_INDEX], kind="stable")
    failures = [batch[schema.ERROR][i] for i in order if _present(batch[schema.ERROR][i])]
    if failures:
        return error_row(file_id, audio, model_name, failures[0])
    indices = [int(batch[schema.CHUNK_INDEX][i]) for i in order]
    if indices != list(range(n)) or not bool(batch[schema.IS_LAST][order[-1]]):
        return error_row(file_id, audio, model_name, row_error(INTERNAL_ERROR, f"chunks missing (got {indices[:10]}...)"))
    chunks = [
        ChunkResult.from_samples(
            batch[schema.CHUNK_INDEX][i], int(batch[schema.START][i]), int(batch[schema.END][i]),
            int(batch[schema.STRIDE_LEFT][i]), int(batch[schema.STRIDE_RIGHT][i]),
            zip(batch[schema.SEG_START][i], batch[schema.SEG_END][i], batch[schema.SEG_TOKENS][i]),
        )
        for i in order
    ]
    tok = _tokenizer(tokenizer_json)
    text, segments = to_text(merge_chunks(chunks), lambda ids: tok.decode(list(ids), skip_special_tokens=True))
    warnings = [batch[schema.WARNING][i] for i in order if _present(batch[schema.WARNING][i])]
    return {
        schema.ID: file_id, schema.AUDIO: audio, schema.TEXT: text,
        schema.SEGMENTS: [{"start": s.start, "end": s.end, "text": s.text} for s in segments],
        schema.LANGUAGE: vote_language([x for x in batch[schema.LANGUAGE] if _present(x)]),
        schema.DURATION_S: round(max(int(x) for x in batch[schema.END]) / SAMPLE_RATE, 3),
        schema.NUM_CHUNKS: n, schema.MODEL: model_name, schema.STATUS: schema.STATUS_OK,
        schema.ERROR: warnings[0] if warnings else None,
    }


def _present(value: Any) -> bool:
    """A set string; null strings can arrive as None or NaN depending on the batch format."""
    return isinstance(value, str) and bool(value)
