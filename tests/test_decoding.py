"""The one decoder's beam search: exact on a network small enough to search exhaustively, and the same answer
for a chunk whether it shares its batch (and its cache's reordering) with other chunks or not."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ray_whisper.asr import features
from ray_whisper.model import network
from ray_whisper.config import DecodingOptions
from ray_whisper.asr.decoding import Decoder
from ray_whisper.asr.tokens import SpecialTokens

# a vocabulary of 5 text tokens (0-4), then end of text and the control tokens, then 4 timestamps
TINY = {"d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2, "decoder_layers": 2,
        "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "vocab_size": 14,
        "num_mel_bins": 80, "max_source_positions": 1500, "max_target_positions": 16}
SPECIAL = SpecialTokens(eot=5, sot=6, no_timestamps=9, timestamp_begin=10, no_speech=8, transcribe=7, translate=7,
                        languages={}, suppress=(), suppress_at_begin=())
TEXT = range(5)


def sequence_logprob(net, feats: torch.Tensor, tokens: list[int], suppress: torch.Tensor) -> float:
    """Log-probability of `tokens` after the prompt, each step's suppressed tokens masked out first."""
    with torch.inference_mode():
        cache = net.new_cache(net.encode(feats), 2 + len(tokens))
        ids = torch.tensor([[SPECIAL.sot, SPECIAL.no_timestamps] + tokens])
        logits = net.decode(ids[:, :-1] if tokens else ids, cache, every_position=True)[0, 1:]
    logits = logits.clone()
    logits[:, suppress] = -math.inf
    return float(logits.log_softmax(-1)[torch.arange(len(tokens)), torch.tensor(tokens)].sum()) if tokens else 0.0


@pytest.mark.parametrize("seed", [0, 4, 5])
def test_beam_search_finds_the_best_sequence_of_an_exhaustive_search(seed):
    """Every sequence of up to 3 tokens scored by its log-probability per token, as the beam ranks them; with
    beams to hold them all, beam search must return the best one and its log-probability."""
    net = network.random_init(TINY, seed=seed)
    with torch.no_grad():
        net.proj_out.weight.mul_(0.3)  # a random network's logits are peaked: soften them so lengths compete
    steps = 3
    options = DecodingOptions(timestamps=False, beam_size=200, max_new_tokens=steps)
    decoder = Decoder(net, SPECIAL, options)
    feats = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(seed))
    candidates = [list(t) + [SPECIAL.eot] for n in range(steps) for t in itertools.product(TEXT, repeat=n)]
    candidates += [list(t) for t in itertools.product(TEXT, repeat=steps)]  # cut at the token limit
    scored = []
    for seq in candidates:
        text = [t for t in seq if t != SPECIAL.eot]
        total = sequence_logprob(net, feats, seq, decoder.suppress)
        scored.append((total / max(len(text), 1), text, total))
    best_score, best, best_total = max(scored)
    runner_up = sorted(scored)[-2][0]
    assert best_score - runner_up > 1e-3, "a near tie: the test would not tell a right answer from a wrong one"
    assert best != max(scored, key=lambda s: s[2])[1], "per-token ranking must matter for this network"
    (got,) = decoder(feats.numpy(), [None])
    assert got.tokens == best, (got.tokens, best, sorted(scored)[-3:])
    assert got.avg_logprob == pytest.approx(best_total / max(len(best), 1), abs=1e-4)


@pytest.mark.slow
def test_a_chunk_decodes_the_same_alone_and_in_a_batch_whose_chunks_end_at_different_steps(bundled_model, speech_clips):
    """Beam search over a batch reorders and drops its chunks' rows as they end; every chunk's answer must be
    the one it gets decoded alone."""
    from ray_whisper.asr.engine import Engine

    jfk, mit = speech_clips[0][0], speech_clips[1][0]
    audio = [jfk, mit, jfk[: 16_000 * 4], mit[16_000 * 10 :]]  # different lengths: they finish at different steps
    feats = features.log_mel(audio, 80)
    tr = Engine(bundled_model, DecodingOptions(beam_size=3), cpu_threads=2)
    together = tr.decoder(feats, [None] * len(audio))
    alone = [tr.decoder(feats[i : i + 1], [None])[0] for i in range(len(audio))]
    assert len({len(r.tokens) for r in together}) == len(audio)
    for t, a in zip(together, alone):
        assert t.tokens == a.tokens
        assert t.avg_logprob == pytest.approx(a.avg_logprob, abs=1e-3)
    assert np.isfinite([r.avg_logprob for r in together]).all()


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_a_row_found_looping_stops_there_and_its_neighbours_go_on(bundled_model, speech_clips, temperature):
    """Decoder's `loops`: every LOOP_CHECK_STEPS steps each greedy or sampled row's tokens so far are asked
    whether they loop; a row that does stops with those tokens (it fails either way, and need not repeat itself
    up to the token limit); the row beside it decodes as it would without the check."""
    from ray_whisper.asr.decoding import LOOP_CHECK_STEPS
    from ray_whisper.asr.engine import Engine

    feats = features.log_mel([speech_clips[0][0], speech_clips[1][0]], 80)
    # float32: in bfloat16 a row's numbers depend on its batch's shape (oneDNN picks kernels by it), so its
    # log-probability moves in the third decimal when its neighbour leaves, whatever the loop check does
    decoder = Engine(bundled_model, DecodingOptions(dtype="float32"), cpu_threads=2).decoder
    free = decoder(feats, [None, None], temperature=temperature, seeds=[3, 4])
    assert free[0].tokens[:4] != free[1].tokens[:4] and len(free[0].tokens) > LOOP_CHECK_STEPS
    asked: list[int] = []

    def loops(tokens: list[int]) -> bool:
        asked.append(len(tokens))
        return tokens[:4] == free[0].tokens[:4]

    cut, whole = decoder(feats, [None, None], temperature=temperature, seeds=[3, 4], loops=loops)
    assert cut.tokens == free[0].tokens[:LOOP_CHECK_STEPS]
    assert whole.tokens == free[1].tokens and whole.avg_logprob == pytest.approx(free[1].avg_logprob, abs=1e-4)
    assert asked and {n % LOOP_CHECK_STEPS for n in asked} == {0}


def test_the_seek_pass_falls_back_on_loops_only():
    """A first pass falls back on a loop or on low log-probability; the seek pass (a chunk's tail, a few words
    padded with silence) only on a loop; a likely no-speech decoding on neither."""
    from ray_whisper.config import DecodingOptions
    from ray_whisper.asr.decoding import Decoded
    from ray_whisper.asr.transcribe import _failed

    opt = DecodingOptions()
    texts = {1: "the tail of a sentence", 2: "again and " * 30}
    text_of = lambda ids: texts[ids[0]]  # noqa: E731
    unlikely, looping = Decoded([1], "en", 0.1, -1.05), Decoded([2], "en", 0.1, -0.3)
    silent = Decoded([1], "en", 0.9, -1.5)
    assert _failed(unlikely, opt, text_of) and _failed(looping, opt, text_of)
    assert not _failed(unlikely, opt, text_of, loops_only=True) and _failed(looping, opt, text_of, loops_only=True)
    assert not _failed(silent, opt, text_of) and not _failed(silent, opt, text_of, loops_only=True)


def test_the_end_of_text_is_held_only_after_a_timestamp_before_the_rows_hold():
    """passes' hold: a row that has just written a timestamp (closing a segment, or opening the next one as
    Whisper does before it stops early) may not end while that timestamp is before its hold; after text, at
    the opening timestamp 0, at or past the hold, or without one, it may."""
    from ray_whisper.asr.decoding import RuleState

    decoder = Decoder.__new__(Decoder)  # _hold needs only the special tokens
    decoder.t = SPECIAL
    yes, no = True, False
    state = RuleState(torch.tensor([yes, yes, no, yes, yes, yes]), torch.tensor([no, yes, yes, no, yes, no]),
                      torch.tensor([3, 3, 3, 5, 0, 3]))
    until = torch.tensor([5, 5, 5, 5, 5, -1])
    logits = torch.zeros(6, TINY["vocab_size"])
    decoder._hold(logits, state, until)
    assert torch.isinf(logits[:, SPECIAL.eot]).tolist() == [yes, yes, no, no, no, no]
    assert logits[:, : SPECIAL.eot].eq(0).all() and logits[:, SPECIAL.eot + 1 :].eq(0).all()  # nothing else


def test_a_sample_follows_its_rows_temperature_and_its_rows_generator_alone():
    """choose_sampled draws each row's token from softmax(logits / its temperature) with its own generator: the
    frequencies follow the distribution, a suppressed token (-inf) never comes, and a row's token is the same
    whatever the rows beside it hold."""
    from ray_whisper.asr.decoding import choose_sampled

    logits = torch.tensor([[0.0, 1.0, -math.inf, 2.0], [3.0, 0.0, 0.0, -math.inf]])
    temperatures = torch.tensor([1.0, 0.5])
    want = (logits / temperatures[:, None]).softmax(-1)
    counts = torch.zeros(2, 4)
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    for _ in range(4000):
        token, logprob = choose_sampled(logits, temperatures, generators)
        counts[[0, 1], token] += 1
        assert torch.allclose(logprob, logits.log_softmax(-1).gather(1, token[:, None])[:, 0])
    assert counts[0, 2] == 0 and counts[1, 3] == 0
    assert torch.allclose(counts / 4000, want, atol=0.03), (counts / 4000, want)
    alone = [choose_sampled(logits[:1], temperatures[:1], [torch.Generator().manual_seed(s)])[0].item() for s in range(40)]
    beside = [choose_sampled(logits[[0, 1]], temperatures, [torch.Generator().manual_seed(s), torch.Generator().manual_seed(99)])
              [0][0].item() for s in range(40)]
    assert alone == beside and len(set(alone)) > 1


@pytest.mark.slow
def test_a_fallback_wave_decodes_as_one_temperature_after_another(bundled_model, speech_clips, monkeypatch):
    """A failing chunk is decoded at its next temperatures at once (transcribe.FALLBACK_ROWS rows a wave); the
    attempts after the first good one stop when it ends. Against one temperature after another: the chunk that
    loops is mended as well, the other is untouched, in fewer decoder steps (a row's numbers in a batch of
    another size may differ in their last bits, so a sample need not be the same token for token); and in the
    decoder a row's later attempt stops at the step its earlier attempt ends good."""
    from conftest import DATA

    from ray_whisper.asr import transcribe
    from ray_whisper.asr.engine import Engine
    from ray_whisper.io.audio import decode_all

    german = decode_all((DATA / "multilingual.mp3").read_bytes())[32 * 16_000 : 50 * 16_000]
    jfk = speech_clips[0][0]
    feats = features.log_mel([german, jfk], 80)
    args = ([None, None], [german.size / 16_000, jfk.size / 16_000])
    options = DecodingOptions(max_new_tokens=96)
    runs = {}
    for rows in (1, transcribe.FALLBACK_ROWS):
        monkeypatch.setattr(transcribe, "FALLBACK_ROWS", rows)
        engine = Engine(bundled_model, options, cpu_threads=2)
        runs[rows] = (engine.transcribe(feats, *args, seeds=[11, 12]), engine.tally)
    (one, one_tally), (wave, wave_tally) = runs[1], runs[transcribe.FALLBACK_ROWS]
    assert one[0].temperature > 0.2  # the premise: the German chunk took more than one fallback temperature
    text = [[transcribe.compression_ratio("".join(engine.text(t) for _, _, t in r.segments)) for r in run]
            for run in (one, wave)]
    assert wave[0].temperature > 0 and text[1][0] < options.compression_ratio_threshold, (wave[0].temperature, text)
    assert wave[1].temperature == one[1].temperature == 0 and wave[1].segments == one[1].segments
    assert wave_tally.decoder_steps < one_tally.decoder_steps, (wave_tally.decoder_steps, one_tally.decoder_steps)
    assert wave_tally.fallback_decodings >= one_tally.fallback_decodings  # as many attempts started or more

    decoder = engine.decoder
    both = feats[[1, 1]]
    alone = decoder(both[:1], [None], temperature=0.2, seeds=[5])[0]
    first, later = decoder(both, [None, None], temperature=[0.2, 0.4], seeds=[5, 5],
                           attempts=([0, 0], lambda d: d.temperature == 0.2))
    assert first.tokens == alone.tokens and len(later.tokens) <= len(first.tokens) + 1
