"""Stitching windows into one transcript, as pure functions on token ids (words stand in for tokens)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from ray_whisper.asr.tokens import SpecialTokens, segments_from_tokens
from ray_whisper.asr.merge import ChunkResult, TokenSegment, longest_common_run, merge_chunks, to_text

WORDS = "the quick brown fox jumps over lazy dog and then runs far away into woods where nobody can see".split()
VOCAB = {w: i for i, w in enumerate(WORDS)}


def ids(text: str) -> tuple[int, ...]:
    return tuple(VOCAB[w] for w in text.split())


def decode(tokens) -> str:
    return " ".join(WORDS[t] for t in tokens)


def chunk(index, start, end, left, right, *segs):
    return ChunkResult(index, start, end, left, right, tuple(TokenSegment(s, e, ids(t)) for s, e, t in segs))


def words(segments) -> str:
    return to_text(segments, decode)[0]


def test_windows_cut_at_pauses_concatenate():
    a = chunk(0, 0.0, 25.0, 0, 0, (0.0, 4.0, "the quick brown fox"), (5.0, 24.0, "jumps over"))
    b = chunk(1, 25.0, 40.0, 0, 0, (0.5, 3.0, "lazy dog"))
    merged = merge_chunks([b, a])  # any order
    assert words(merged) == "the quick brown fox jumps over lazy dog"
    assert [(s.start, s.end) for s in merged] == [(0.0, 4.0), (5.0, 24.0), (25.5, 28.0)]


def test_overlap_words_appear_once():
    # window 0 = [0, 30), window 1 = [24, 50): overlap 24-30 heard by both
    a = chunk(0, 0.0, 30.0, 0, 3.0, (0.0, 30.0, "the quick brown fox jumps over lazy dog"))
    b = chunk(1, 24.0, 50.0, 3.0, 0, (0.0, 26.0, "jumps over lazy dog and then runs far away"))
    assert words(merge_chunks([a, b])) == "the quick brown fox jumps over lazy dog and then runs far away"


def test_boundary_inside_a_word_is_not_doubled_or_dropped():
    # the cut went through "fox": window 0 heard "fox" whole, window 1 heard a fragment it misread as "far"
    a = chunk(0, 0.0, 30.0, 0, 3.0, (20.0, 30.0, "the quick brown fox jumps over"))
    b = chunk(1, 24.0, 50.0, 3.0, 0, (0.0, 8.0, "far brown fox jumps over lazy dog"))
    assert words(merge_chunks([a, b])) == "the quick brown fox jumps over lazy dog"


def test_a_phrase_repeated_far_from_the_overlap_is_not_taken_for_it():
    # "brown fox jumps" also occurs 15 s before the overlap; aligning there would drop the middle
    a = chunk(0, 0.0, 30.0, 0, 3.0, (0.0, 4.0, "over lazy dog"), (11.0, 13.0, "brown fox jumps"), (26.0, 30.0, "and then"))
    b = chunk(1, 24.0, 50.0, 3.0, 0, (2.0, 4.0, "and then"), (5.0, 12.0, "brown fox jumps far away"))
    assert words(merge_chunks([a, b])) == "over lazy dog brown fox jumps and then brown fox jumps far away"


def test_no_common_run_falls_back_to_the_cut_time():
    # two readings of the overlap that share nothing: keep the left one before the middle, the right after
    a = chunk(0, 0.0, 30.0, 0, 3.0, (0.0, 10.0, "the quick"), (25.0, 27.0, "brown fox"))
    b = chunk(1, 24.0, 50.0, 3.0, 0, (0.0, 2.0, "lazy"), (4.0, 26.0, "dog and"))
    merged = merge_chunks([a, b])
    assert words(merged) == "the quick brown fox dog and"


def test_segment_split_by_the_splice_is_joined():
    a = chunk(0, 0.0, 30.0, 0, 3.0, (20.0, 30.0, "the quick brown fox jumps"))
    b = chunk(1, 24.0, 50.0, 3.0, 0, (0.0, 10.0, "fox jumps over lazy"), (11.0, 14.0, "dog"))
    merged = merge_chunks([a, b])
    assert words(merged) == "the quick brown fox jumps over lazy dog"
    assert len(merged) == 2 and merged[0].start == 20.0 and merged[0].end == 34.0


def test_longest_common_run():
    assert longest_common_run([1, 2, 3, 4, 5], [9, 3, 4, 5, 8]) == (2, 1, 3)
    assert longest_common_run([1, 2], [3, 4]) == (0, 0, 0)


def test_segments_past_the_window_are_clipped_and_empty_text_dropped():
    a = chunk(0, 0.0, 10.0, 0, 0, (0.0, 12.0, "the quick"))
    merged = merge_chunks([a])
    assert merged[0].end == 10.0
    text, segs = to_text(merged + [TokenSegment(10.0, 11.0, ())], decode)
    assert text == "the quick" and len(segs) == 1


SPECIAL = SpecialTokens(
    eot=100, sot=101, no_timestamps=102, timestamp_begin=103, no_speech=99, transcribe=98, translate=97,
    languages={}, suppress=(), suppress_at_begin=(),
)


def ts(seconds: float) -> int:
    return SPECIAL.timestamp_begin + round(seconds / 0.02)


def test_segments_from_timestamp_tokens():
    tokens = [ts(0.0), 1, 2, ts(2.0), ts(2.0), 3, ts(4.5), ts(5.0), 4, 5]  # last segment unfinished
    assert segments_from_tokens(tokens, SPECIAL, 30.0, True) == [
        (0.0, 2.0, [1, 2]),
        (2.0, 4.5, [3]),
        (5.0, 30.0, [4, 5]),
    ]
    assert segments_from_tokens([1, 2, 3], SPECIAL, 12.0, False) == [(0.0, 12.0, [1, 2, 3])]
    assert segments_from_tokens([], SPECIAL, 12.0, True) == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 30.0), st.floats(0.0, 30.0), st.lists(st.integers(0, len(WORDS) - 1), max_size=6)
        ),
        max_size=5,
    ),
    st.lists(
        st.tuples(
            st.floats(0.0, 30.0), st.floats(0.0, 30.0), st.lists(st.integers(0, len(WORDS) - 1), max_size=6)
        ),
        max_size=5,
    ),
    st.sampled_from([0.0, 3.0]),
)
def test_merged_timestamps_are_monotonic_and_inside_the_file(segs_a, segs_b, stride):
    def mk(index, start, end, left, right, segs):
        return ChunkResult(
            index, start, end, left, right, tuple(TokenSegment(min(s, e), max(s, e), tuple(t)) for s, e, t in segs)
        )

    a = mk(0, 0.0, 30.0, 0.0, stride, segs_a)
    b = mk(1, 30.0 - 2 * stride, 55.0, stride, 0.0, segs_b)
    merged = merge_chunks([a, b])
    last_end = 0.0
    for s in merged:
        assert last_end <= s.start <= s.end <= 55.0
        last_end = s.end
    # nothing invented: every merged token came from one of the windows
    pool = [t for _, _, toks in segs_a + segs_b for t in toks]
    assert all(pool.count(t) >= sum(s.tokens.count(t) for s in merged) for t in set(pool))
