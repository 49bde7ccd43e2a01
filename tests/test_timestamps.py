"""Timestamps after quiet noise, and words of a sentence said twice: real speech (jfk.flac) after 40-50 s of
low white, pink or brown noise (-50/-60 dBFS) or of digital silence, through the batch job's own chunks, engine
and merge with the real model. Whisper must open a window's first segment within its first second, so speech
11-26 s into a chunk that starts in noise used to be stamped at the chunk's start (30.0 s for speech at 51.05 s)."""

from __future__ import annotations

import numpy as np
import pytest

from ray_whisper.asr.alignment import WordAligner, lengthen_instant_words, open_segment, token_start_frames
from ray_whisper.asr.merge import TokenSegment, Word, to_text
from ray_whisper.constants import SAMPLE_RATE, SECONDS_PER_TOKEN

from conftest import DATA

REFERENCE = ("And so my fellow Americans, ask not what your country can do for you, ask what you can do for "
             "your country.")
JFK_SPEECH_S = 0.3  # "And" begins 0.3 s into jfk.flac (its recording noise starts at once)


def noise(kind: str, seconds: float, dbfs: float, seed: int) -> np.ndarray:
    """Seeded noise at an RMS level: white, pink (1/f power) or brown (integrated white, drift removed)."""
    n = int(seconds * SAMPLE_RATE)
    if kind == "silence":
        return np.zeros(n, np.float32)
    w = np.random.default_rng(seed).standard_normal(n)
    if kind == "pink":
        f = np.fft.rfft(w)
        f /= np.sqrt(np.maximum(np.arange(f.size), 1))
        w = np.fft.irfft(f, n)
    elif kind == "brown":
        w = np.cumsum(w)
        w -= np.convolve(w, np.full(1601, 1 / 1601), mode="same")  # no drift below 10 Hz
    return (w / np.sqrt(np.mean(w**2)) * 10 ** (dbfs / 20)).astype(np.float32)


def speech_after(kind: str, dbfs: float, at_s: float, jfk: np.ndarray, seed: int = 0) -> np.ndarray:
    """Noise throughout, with jfk.flac added from `at_s` on and 2 s of noise after it."""
    audio = noise(kind, at_s + jfk.size / SAMPLE_RATE + 2, dbfs, seed)
    start = int(at_s * SAMPLE_RATE)
    audio[start : start + jfk.size] += jfk
    return audio


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    from ray_whisper.io.audio import decode_all

    return decode_all((DATA / "jfk.flac").read_bytes())


@pytest.fixture(scope="module")
def engines(bundled_model):
    from ray_whisper.asr.engine import Engine
    from ray_whisper.config import DecodingOptions

    return {words: Engine(bundled_model, DecodingOptions(word_timestamps=words), cpu_threads=2)
            for words in (False, True)}


@pytest.mark.slow
@pytest.mark.parametrize("kind, dbfs, at_s", [("white", -50, 51.05), ("pink", -60, 41.3), ("brown", -50, 51.05),
                                               ("silence", 0, 51.05)])
def test_the_first_segment_and_word_start_at_the_speech(engines, jfk, kind, dbfs, at_s):
    from ray_whisper.asr.evaluation import transcribe_in_memory, wer

    onset = at_s + JFK_SPEECH_S
    for words, engine in engines.items():
        text, segments = transcribe_in_memory(speech_after(kind, dbfs, at_s, jfk), engine)
        assert wer([REFERENCE], [text]) < 0.3, text
        assert abs(segments[0].start - onset) < 1.0, (words, segments[0])
        if words:
            first = segments[0].words[0]
            assert abs(first.start - onset) < 1.0 and first.start < first.end, first


@pytest.mark.slow
@pytest.mark.parametrize("gap_s", [1.0])
def test_a_sentence_said_twice_has_no_zero_length_word(engines, jfk, gap_s):
    from ray_whisper.asr.evaluation import transcribe_in_memory

    audio = np.concatenate([jfk, np.zeros(int(gap_s * SAMPLE_RATE), np.float32), jfk])
    _, segments = transcribe_in_memory(audio, engines[True])
    words = [w for s in segments for w in s.words]
    assert len(words) >= 40, [w.word for w in words]  # 22 words, twice
    assert [w for w in words if w.end <= w.start] == []


def test_a_first_word_stretched_over_a_pause_is_cut_to_twice_the_median_word():
    words = [Word(" And", 0.0, 11.7, 0.9, 1), Word(" so", 11.7, 12.0, 0.9, 1)]
    assert open_segment(words, 0.0, 0.6)[0].start == pytest.approx(11.1)
    assert open_segment(words, 11.4, 0.6)[0].start == 11.4  # the segment's opening, inside the word, wins
    assert open_segment(words, 0.0, 0.0)[0].start == 0.0  # no median: left alone
    assert open_segment(words[1:], 0.0, 0.6) == words[1:]  # a short word is left alone


def test_segments_of_only_punctuation_are_dropped():
    decode = {1: " .", 2: " Hello", 3: " world.", 4: " ...", 5: " ¿"}.get
    text, segments = to_text([TokenSegment(0.0, 1.0, (1, 1, 4)), TokenSegment(1.0, 2.0, (2, 3)),
                              TokenSegment(2.0, 3.0, (5,))], lambda ids: "".join(decode(i) for i in ids))
    assert text == "Hello world." and [s.start for s in segments] == [1.0]


def test_words_the_path_crosses_in_one_frame_get_time():
    """Cross-attention whose last words point past the chunk's audio (as a sentence said a second time can):
    the path runs straight down through their rows, and each still gets time, in order, inside the chunk."""
    peaks = [5, 15, 25, 35, 60, 60, 60, 61]  # frames the 7 tokens and the end of text attend to; audio: 50 frames
    attention = np.random.default_rng(0).random((2, len(peaks), 1500)).astype(np.float32) * 0.01
    for row, frame in enumerate(peaks):
        attention[:, row, frame - 1 : frame + 2] += 1.0
    duration = 50 * SECONDS_PER_TOKEN
    starts = token_start_frames(attention, duration)
    assert len(set(starts)) < len(starts)  # the path enters some rows in the same frame: instant words
    aligner = WordAligner.__new__(WordAligner)  # only its word grouping is used: no model
    vocab = dict(enumerate([" ask", " not", " what", " your", " country", " can", " do"], start=1))
    aligner.decode = lambda ids: "".join(vocab[i] for i in ids)
    words = aligner._words(attention, list(vocab), np.ones(len(vocab)), "en", duration)
    assert [w.word for w in words] == list(vocab.values())
    assert all(w.end > w.start for w in words), words
    assert all(a.end <= b.start + 1e-9 for a, b in zip(words, words[1:])) and words[-1].end <= duration + 1e-9


def test_an_instant_word_takes_the_pause_after_it_or_shares_a_neighbours_span():
    def w(text, start, end, tokens=1):
        return Word(text, start, end, 0.9, tokens)

    spoken = [w(" a", 0.0, 0.4), w(" b", 0.4, 0.8)]  # typical word: 0.4 s
    paused = lengthen_instant_words(spoken + [w(" c", 0.8, 0.8), w(" d", 0.8, 0.8), w(" e", 5.0, 5.4)], 6.0)
    assert [(x.start, x.end) for x in paused[2:4]] == [(0.8, pytest.approx(1.2)), (pytest.approx(1.2), pytest.approx(1.6))]
    shared = lengthen_instant_words(spoken + [w(" c", 0.8, 0.8), w(" d", 0.8, 1.4, tokens=2)], 6.0)
    assert [(x.start, x.end) for x in shared[2:]] == [(0.8, pytest.approx(1.0)), (pytest.approx(1.0), 1.4)]
    at_end = lengthen_instant_words(spoken + [w(" c", 0.8, 0.8)], 0.8)
    assert [(x.start, x.end) for x in at_end[1:]] == [(0.4, pytest.approx(0.6)), (pytest.approx(0.6), 0.8)]
    assert lengthen_instant_words([w(" a", 0.0, 0.0)], 0.0) == [w(" a", 0.0, 0.0)]  # no audio: nothing to give
