"""The stages one after another, without Ray: manifest rows -> chunk rows (preprocess) -> token rows (the model
actor called on a batch, as map_batches calls it) -> one output row per file (the assemble actor, fed the token
rows in two batches in any order). Each stage's columns are the ones schema.py names, and a stage handed rows
without the columns it needs says which."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ray_whisper import evaluation as ev
from ray_whisper import schema
from ray_whisper.assemble import Assembler
from ray_whisper.chunking import ChunkGeometry
from ray_whisper.config import DecodingOptions
from ray_whisper.errors import ContractError
from ray_whisper.preprocess import chunk_batch

from conftest import DATA, REFS

pytestmark = pytest.mark.slow


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A batch as Ray Data hands it to a batch_format="numpy" callable."""
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


@pytest.fixture(scope="module")
def transcriber(bundled_model):
    from ray_whisper.inference import Transcriber

    return Transcriber(bundled_model, DecodingOptions(), cpu_threads=2)


def test_each_stage_takes_the_previous_stages_rows(transcriber, tmp_path):
    manifest = pa.table({schema.ID: ["jfk", "gone"], schema.AUDIO: [str(DATA / "jfk.flac"), str(tmp_path / "gone.wav")],
                         schema.LANGUAGE: [None, None]})
    chunks = pa.concat_tables(list(chunk_batch(manifest, ChunkGeometry(), transcriber.n_mels)))
    assert chunks.schema.equals(schema.CHUNK_SCHEMA)
    tokens = transcriber(numpy_batch(chunks))
    assert set(tokens) == set(schema.TOKEN_COLUMNS)
    assert all(len(v) == chunks.num_rows for v in tokens.values())
    assembler = Assembler(transcriber.tokenizer.to_str(), "m", "fp")
    order = np.random.default_rng(0).permutation(chunks.num_rows)  # the actor may see a file's chunks in any order
    halves = [order[: len(order) // 2], order[len(order) // 2 :]]
    tables = [assembler({k: np.asarray(v, dtype=object)[h] for k, v in tokens.items()}) for h in halves]
    assert not assembler.pending  # every file complete, none held back
    rows = {r[schema.ID]: r for t in tables for r in t.to_pylist()}
    assert all(t.schema.equals(schema.OUTPUT_SCHEMA) for t in tables) and len(rows) == 2
    assert rows["jfk"][schema.STATUS] == schema.STATUS_OK
    assert ev.wer([REFS["jfk.flac"]["text"]], [rows["jfk"][schema.TEXT]]) <= 0.05
    assert rows["gone"][schema.STATUS] == schema.STATUS_ERROR
    assert rows["gone"][schema.ERROR].startswith("fetch_error: not found")


def test_a_stage_without_the_columns_it_needs_says_which(transcriber):
    chunks = pa.concat_tables(list(chunk_batch(
        pa.table({schema.ID: ["jfk"], schema.AUDIO: [str(DATA / "jfk.flac")], schema.LANGUAGE: [None]}),
        ChunkGeometry(), transcriber.n_mels)))
    with pytest.raises(ContractError, match="model stage got rows without features"):
        transcriber(numpy_batch(chunks.drop_columns([schema.FEATURES])))
    tokens = transcriber(numpy_batch(chunks))
    with pytest.raises(ContractError, match="assemble stage got rows without seg_tokens"):
        Assembler(transcriber.tokenizer.to_str(), "m", "fp")({k: v for k, v in tokens.items() if k != schema.SEG_TOKENS})
    with pytest.raises(ContractError, match="audio"):
        list(chunk_batch(pa.table({schema.ID: ["x"]}), ChunkGeometry(), 80))
