"""The CPU stage without Ray: manifest rows -> chunk rows, for files with any number of chunks."""

import numpy as np
import pyarrow as pa
import pytest

from ray_whisper.asr import features
from ray_whisper import schema
from ray_whisper.asr.chunking import ChunkGeometry
from ray_whisper.batch.cpu_stage import chunk_batch
from ray_whisper.schema import CHUNK_SCHEMA

from conftest import write_wav


def manifest(paths):
    return pa.table({"id": [f"f{i}" for i in range(len(paths))], "audio": [str(p) for p in paths],
                     "language": [None] * len(paths)})


def speech_like(seconds, seed):
    """Loud tone bursts separated by 0.5 s pauses every ~6 s, so windows end in pauses."""
    rng = np.random.default_rng(seed)
    parts = []
    while sum(p.size for p in parts) < seconds * 16_000:
        parts.append((0.3 * np.sin(np.arange(int(5.5 * 16_000)) / 7.0) + 0.02 * rng.standard_normal(int(5.5 * 16_000))).astype(np.float32))
        parts.append(np.zeros(8_000, np.float32))
    return np.concatenate(parts)[: int(seconds * 16_000)]


@pytest.mark.parametrize("seconds", [3, 29, 61, 7 * 29 + 10, 8 * 29 + 10, 9 * 29 + 10])
def test_every_file_ends_with_exactly_one_last_window(tmp_path, seconds):
    """Regression: a last window that filled a feature group exactly used to lose its is_last flag."""
    path = write_wav(tmp_path / "a.wav", speech_like(seconds, 0))
    rows = pa.concat_tables(list(chunk_batch(manifest([path]), ChunkGeometry(), 80))).to_pylist()
    assert [r[schema.CHUNK_INDEX] for r in rows] == list(range(len(rows)))
    assert [r[schema.IS_LAST] for r in rows] == [False] * (len(rows) - 1) + [True]
    assert rows[-1][schema.END] == seconds * 16_000 and rows[0][schema.START] == 0
    feats = features.from_bytes([r[schema.FEATURES] for r in rows], 80)
    assert feats.shape == (len(rows), 80, 3000) and np.isfinite(feats).all()
    assert all(r[schema.ERROR] is None for r in rows)


def test_silent_windows_carry_no_features_and_errors_one_row(tmp_path):
    silent = write_wav(tmp_path / "s.wav", np.zeros(16_000 * 40, np.float32))
    blocks = list(chunk_batch(manifest([silent, tmp_path / "missing.wav"]), ChunkGeometry(), 80))
    assert all(b.schema.equals(CHUNK_SCHEMA) for b in blocks)
    rows = pa.concat_tables(blocks).to_pylist()
    silent_rows = [r for r in rows if r["id"] == "f0"]
    assert len(silent_rows) == 2 and all(r[schema.FEATURES] == b"" for r in silent_rows)
    (err,) = [r for r in rows if r["id"] == "f1"]
    assert err[schema.ERROR].startswith("fetch_error: ") and err[schema.IS_LAST] and err[schema.FEATURES] == b""
