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


def test_features_match_whisper_feature_extractor(speech_clips):
    """The numpy log-mel against transformers' WhisperFeatureExtractor (Whisper's own recipe) on real speech:
    a full window, a short one (zero-padded to 30 s) and a silent one, 80 and 128 mel bins."""
    from transformers import WhisperFeatureExtractor

    jfk, mit = speech_clips[0][0], speech_clips[1][0]
    windows = [mit, jfk[: 16_000 * 3], np.zeros(16_000, np.float32)]
    for n_mels in (80, 128):
        ours = features.log_mel(windows, n_mels)
        theirs = WhisperFeatureExtractor(feature_size=n_mels)(windows, sampling_rate=16_000, return_tensors="np")
        assert ours.shape == theirs.input_features.shape == (3, n_mels, 3000)
        assert np.abs(ours - theirs.input_features).max() < 1e-4  # float16 transport rounds at ~1e-3


def test_the_decode_stage_needs_no_torch_and_keeps_blas_on_one_thread(tmp_path):
    """A decode worker never imports torch (its import and first STFT cost 0.9 s and 210 MB of every worker)
    and computes the filter product on one BLAS thread, putting the thread count back after."""
    import subprocess
    import sys

    path = write_wav(tmp_path / "a.wav", speech_like(45, 1))
    script = f"""
import sys
import pyarrow as pa
import threadpoolctl
from ray_whisper.asr import features
from ray_whisper.asr.chunking import ChunkGeometry
from ray_whisper.batch.cpu_stage import chunk_batch

blas = lambda info: [p["num_threads"] for p in info if p["user_api"] == "blas"]
before = blas(threadpoolctl.threadpool_info())
seen = []
product = features._log_mel
features._log_mel = lambda *a: (seen.append(threadpoolctl.threadpool_info()), product(*a))[1]
table = pa.table({{"id": ["a"], "audio": [{str(path)!r}]}})
rows = sum(b.num_rows for b in chunk_batch(table, ChunkGeometry(), 80))
print(rows, "torch" in sys.modules, sorted({{n for i in seen for n in blas(i)}}), blas(threadpoolctl.threadpool_info()) == before)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "False", "[1]", "True"]  # 2 chunks; no torch; one BLAS thread inside, the count put back
