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


def transcribe_files(transcriber, paths: list) -> dict[str, dict]:
    """Files through the three stages in this process; output rows by id (the file names' stems)."""
    manifest = pa.table({schema.ID: [p.stem for p in paths], schema.AUDIO: [str(p) for p in paths],
                         schema.LANGUAGE: [None] * len(paths)})
    chunks = pa.concat_tables(list(chunk_batch(manifest, ChunkGeometry(), transcriber.n_mels)))
    tokens = transcriber(numpy_batch(chunks))
    table = Assembler(transcriber.tokenizer.to_str(), "m", "fp")(tokens)
    return {r[schema.ID]: r for r in table.to_pylist()}


def test_a_truncated_file_keeps_every_second_that_decodes_and_says_so(transcriber, tmp_path, speech_clips):
    """A FLAC cut at 85% and a short file cut at 60%: the row is ok, carries the `truncated:` warning, and
    transcribes up to where the audio stops (a warning used to make the model skip the file's last chunk)."""
    from audio_helpers import encode

    long_audio, _ = ev.build_long_speech(speech_clips, 85, seed=3)
    whole = encode(long_audio, 16_000, tmp_path / "whole.flac")
    data = whole.read_bytes()
    (tmp_path / "long_cut.flac").write_bytes(data[: int(len(data) * 0.85)])
    jfk = (DATA / "jfk.flac").read_bytes()
    (tmp_path / "short_cut.flac").write_bytes(jfk[: int(len(jfk) * 0.6)])
    rows = transcribe_files(transcriber, [tmp_path / "long_cut.flac", tmp_path / "short_cut.flac"])

    long_row, short_row = rows["long_cut"], rows["short_cut"]
    for row in (long_row, short_row):
        assert row[schema.STATUS] == schema.STATUS_OK and row[schema.ERROR].startswith("truncated: "), row[schema.ERROR]
    assert long_row[schema.NUM_CHUNKS] == 3 and long_row[schema.DURATION_S] > 0.8 * len(long_audio) / 16_000
    assert long_row[schema.SEGMENTS][-1]["end"] > long_row[schema.DURATION_S] - 10  # its last chunk was transcribed
    assert 5 < short_row[schema.DURATION_S] < 8
    assert "fellow americans" in ev.normalize(short_row[schema.TEXT])
