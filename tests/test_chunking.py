"""Chunk planning as pure functions on synthetic audio."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_whisper.constants import N_SAMPLES, SAMPLE_RATE
from ray_whisper.asr.chunking import ChunkGeometry, find_cut, iter_chunks, plan_chunks

SR = SAMPLE_RATE
GEOM = ChunkGeometry(stride=3 * SR)


def tone(seconds: float, amp: float = 0.3, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    """Speech-like loud signal: a tone with noise, no pauses."""
    n = int(seconds * SR)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return (amp * (np.sin(2 * np.pi * freq * t) + 0.15 * rng.standard_normal(n))).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


def check_tiling(windows, n):
    assert windows[0].start == 0 and windows[0].stride_left == 0
    assert windows[-1].end == n and windows[-1].is_last and windows[-1].stride_right == 0
    assert [w.index for w in windows] == list(range(len(windows)))
    for w in windows:
        assert 0 < w.end - w.start <= GEOM.length
        lo, hi = w.owned
        assert lo < hi, "every window owns some audio"
    for a, b in zip(windows, windows[1:]):
        assert not a.is_last
        assert a.owned[1] == b.owned[0], "owned spans tile the file with no gap or overlap"
        assert b.start == a.end - a.stride_right - b.stride_left
        assert a.stride_right == b.stride_left


def test_shorter_than_one_window_is_one_window():
    audio = tone(7.3)
    (w,) = plan_chunks(audio, GEOM)
    assert (w.start, w.end, w.stride_left, w.stride_right, w.is_last) == (0, audio.size, 0, 0, True)


def test_exactly_one_window_is_not_split():
    (w,) = plan_chunks(tone(30.0), GEOM)
    assert w.end == N_SAMPLES and w.is_last


def test_empty_audio_gives_no_windows():
    assert plan_chunks(np.zeros(0, np.float32), GEOM) == []


def test_cut_lands_in_the_pause():
    # speech 0-25 s, a pause 25.0-25.6 s, speech again: the cut must fall inside the pause, with no overlap
    audio = np.concatenate([tone(25.0), silence(0.6), tone(20.0, seed=1)])
    windows = plan_chunks(audio, GEOM)
    check_tiling(windows, audio.size)
    first = windows[0]
    assert 25.0 * SR <= first.end <= 25.6 * SR
    assert first.stride_right == 0 and windows[1].stride_left == 0


def test_quiet_gap_between_words_is_found_without_digital_silence():
    # a gap 30 dB down (room noise), not zeros
    audio = np.concatenate([tone(24.0), tone(0.4, amp=0.01, seed=3), tone(20.0, seed=1)])
    first = plan_chunks(audio, GEOM)[0]
    assert 24.0 * SR <= first.end <= 24.4 * SR and first.stride_right == 0


def test_no_pause_means_overlapping_strides_around_the_cut():
    # continuous sound: a boundary inside a word, so the windows must overlap by a stride on each side
    audio = tone(70.0)
    windows = plan_chunks(audio, GEOM)
    check_tiling(windows, audio.size)
    assert len(windows) >= 3
    assert windows[0].stride_right == GEOM.stride and windows[1].stride_left == GEOM.stride


def test_find_cut_prefers_the_quietest_point_in_the_search_zone():
    audio = tone(30.0)
    audio[int(27.0 * SR) : int(27.3 * SR)] = 0.0
    audio[int(5.0 * SR) : int(6.0 * SR)] = 0.0  # outside the search zone: ignored
    cut, is_pause = find_cut(audio, GEOM)
    assert is_pause and 27.0 * SR <= cut <= 27.3 * SR


def test_streaming_pieces_give_the_same_windows_and_samples():
    audio = np.concatenate([tone(26.0), silence(0.5), tone(40.0, seed=2), silence(0.3), tone(12.0, seed=4)])
    whole = list(iter_chunks([audio], GEOM))
    pieces = [audio[i : i + 7919] for i in range(0, audio.size, 7919)]
    streamed = list(iter_chunks(pieces, GEOM))
    assert [w for w, _ in whole] == [w for w, _ in streamed]
    for (w, a), (_, b) in zip(whole, streamed):
        assert np.array_equal(a, b) and np.array_equal(a, audio[w.start : w.end])


def test_geometry_rejects_strides_that_leave_nothing_owned():
    with pytest.raises(ValueError):
        ChunkGeometry(length=N_SAMPLES, search=8 * SR, stride=6 * SR)


@settings(max_examples=40, deadline=None)
@given(
    segments=st.lists(
        st.tuples(st.floats(0.05, 35.0), st.booleans()), min_size=1, max_size=8
    ),
    stride_s=st.sampled_from([0.0, 1.0, 3.0, 5.0]),
)
def test_windows_cover_the_audio_exactly(segments, stride_s):
    """Invariant: whatever the mix of sound and silence, owned spans tile [0, n) and windows fit the encoder."""
    parts = [tone(d, seed=i) if loud else silence(d) for i, (d, loud) in enumerate(segments)]
    audio = np.concatenate(parts)
    geom = ChunkGeometry(stride=int(stride_s * SR))
    windows = plan_chunks(audio, geom)
    if audio.size == 0:
        assert windows == []
        return
    check_tiling(windows, audio.size)
    assert all(w.end - w.start <= geom.length for w in windows)
