"""The merge stage: all token rows of one file -> its output row (text, timed segments, status)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from . import schema
from .audio import SAMPLE_RATE
from .inference import vote_language
from .merge import ChunkResult, merge_chunks, to_text


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str):
    # the bare `tokenizers` library: merge workers never import transformers (seconds per process)
    import tokenizers

    return tokenizers.Tokenizer.from_str(tokenizer_json)


def _row(batch: dict[str, np.ndarray], i: int, model_name: str, **fields: Any) -> dict[str, Any]:
    base = {
        schema.ID: str(batch[schema.ID][i]),
        schema.AUDIO: str(batch[schema.AUDIO][i]),
        "text": None,
        "segments": None,
        schema.LANGUAGE: None,
        "duration_s": None,
        "num_chunks": 0,
        "model": model_name,
        "status": schema.STATUS_ERROR,
        schema.ERROR: None,
    }
    base.update(fields)
    return base


def merge_file(batch: dict[str, np.ndarray], tokenizer_json: str, model_name: str) -> pa.Table:
    """map_groups function: one file's token rows (any order) -> one output row.

    `tokenizer_json` is the model's serialized fast tokenizer, used to turn merged token ids into text."""
    n = len(batch[schema.ID])
    order = np.argsort(batch[schema.CHUNK_INDEX], kind="stable")
    errors = [(batch[schema.ERROR_KIND][i], batch[schema.ERROR][i]) for i in order if _present(batch[schema.ERROR][i])]
    failures = [(k, e) for k, e in errors if k != "warning"]
    if failures:
        kind, message = failures[0]
        return _table([_row(batch, 0, model_name, error=f"{kind}: {message}")])
    indices = [int(batch[schema.CHUNK_INDEX][i]) for i in order]
    if indices != list(range(n)) or not bool(batch[schema.IS_LAST][order[-1]]):
        return _table([_row(batch, 0, model_name, error=f"internal_error: windows missing (got {indices[:10]}...)")])
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
    warning = errors[0][1] if errors else None
    return _table(
        [
            _row(
                batch,
                0,
                model_name,
                text=text,
                segments=[{"start": s.start, "end": s.end, "text": s.text} for s in segments],
                language=vote_language([x for x in batch[schema.LANGUAGE] if _present(x)]),
                duration_s=round(max(int(x) for x in batch[schema.END]) / SAMPLE_RATE, 3),
                num_chunks=n,
                status=schema.STATUS_OK,
                error=warning,
            )
        ]
    )


def _present(value: Any) -> bool:
    """A set string; null strings can arrive as None or NaN depending on the batch format."""
    return isinstance(value, str) and bool(value)


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema.OUTPUT_SCHEMA)
