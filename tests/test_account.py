"""The account of a run's time: the engine's tally counts what it did (a real temperature fallback on tiny.en's
German loop), the phases of batch.account add up to the run's seconds, and a real run through Ray carries them
in its summary."""

from __future__ import annotations

import pytest

from ray_whisper.asr import features
from ray_whisper.asr.tally import Tally
from ray_whisper.batch.account import PHASES, account, phases
from ray_whisper.config import DecodingOptions


def test_phases_run_from_the_start_to_the_summary_and_add_up():
    at = {"started": 100.0, "prepared": 100.5, "ray_started": 103.0, "load_started": 105.0, "loaded": 107.5,
          "first_batch": 108.0, "last_batch_end": 150.0, "ran": 151.0, "ended": 151.25}
    out = phases(at)
    assert list(out) == [name for name, _ in PHASES]
    assert out["model_load"] == 2.5 and out["model"] == 42.0 and out["complete"] == 0.25
    assert sum(out.values()) == pytest.approx(at["ended"] - at["started"])
    # no model actor reported (nothing to transcribe, or every report lost): its phases join the next one
    driver = {k: at[k] for k in ("started", "prepared", "ray_started", "ran", "ended")}
    out = phases(driver)
    assert out == {"prepare": 0.5, "ray_start": 2.5, "actor_start+model_load+first_input+model+drain": 48.0,
                   "complete": 0.25}


def test_the_account_follows_the_actor_that_finished_last_and_sums_every_actors_tally():
    moments = {"started": 0.0, "prepared": 1.0, "ray_started": 3.0, "ran": 40.0, "ended": 41.0}

    def actor(load_started, first, last, busy, windows):
        clock = {"load_started": load_started, "loaded": load_started + 2, "first_batch": first,
                 "last_batch_end": last, "busy_s": busy, "batches": 3, "threads": 1}
        return {"clock": clock, "tally": Tally(chunks=windows, encoder_windows=windows).as_dict()}

    out = account(moments, [actor(4.0, 7.0, 30.0, 20.0, 10), actor(5.0, 8.0, 38.0, 25.0, 12)])
    assert out["phases_s"]["model"] == 30.0 and out["phases_s"]["actor_start"] == 2.0  # the second actor's
    assert sum(out["phases_s"].values()) == pytest.approx(41.0)
    assert out["model_busy_s"] == 45.0 and out["model_phase_busy_s"] == 25.0 and out["model_batches"] == 6
    assert out["tally"]["encoder_windows"] == 22 and out["model_load_s"] == [2.0, 2.0]


@pytest.mark.slow
def test_the_tally_counts_a_real_fallback_and_its_cost(bundled_model, speech_clips):
    """tiny.en loops on the German half of multilingual.mp3 (test_inference's fallback test): that chunk, and
    only it, is decoded again at higher temperatures, and the tally says so; with one temperature, none is."""
    from conftest import DATA

    from ray_whisper.asr.engine import Engine
    from ray_whisper.io.audio import decode_all

    german = decode_all((DATA / "multilingual.mp3").read_bytes())[32 * 16_000 : 50 * 16_000]
    jfk = speech_clips[0][0]
    feats = features.log_mel([german, jfk], 80)
    args = ([None, None], [german.size / 16_000, jfk.size / 16_000])
    short = {"max_new_tokens": 96}
    plain = Engine(bundled_model, DecodingOptions(temperatures="0", **short), cpu_threads=2)
    plain.transcribe(feats, *args, seeds=[11, 12])
    assert plain.tally.fallback_chunks == plain.tally.fallback_decodings == 0 and plain.tally.fallback_s == 0
    assert plain.tally.chunks == 2 and plain.tally.encoder_windows >= 2 and plain.tally.decoder_steps > 2

    engine = Engine(bundled_model, DecodingOptions(**short), cpu_threads=2)
    first = engine.transcribe(feats, *args, seeds=[11, 12])
    tally = engine.tally
    assert first[0].temperature > 0 and first[1].temperature == 0  # the premise: the German chunk fell back
    assert tally.fallback_chunks >= 1 and tally.fallback_decodings >= 1 and 0 < tally.fallback_s
    assert tally.decoder_steps > plain.tally.decoder_steps  # the fallback's steps are counted too
    # a window each on the first pass and on a second pass (its shifted window); their fallbacks reuse them
    assert tally.encoder_windows == 2 + tally.second_passes
    assert tally.decoder_s + tally.encoder_s > 0 and tally.chunks == 2


@pytest.mark.slow
def test_a_run_through_ray_accounts_for_its_seconds_in_its_summary(tmp_path, ray_session, bundled_model):
    """The model actor's report reaches the driver through Ray's KV: the summary's phases cover the run from its
    start to its summary, the model's among them, and the tally counts the chunks decoded."""
    import json
    import shutil

    import ray_whisper
    from conftest import DATA

    for name in ("jfk.flac", "multilingual.mp3"):
        shutil.copy(DATA / name, tmp_path / name)
    (tmp_path / "manifest.csv").write_text("id,audio\njfk,jfk.flac\nmit,multilingual.mp3\n")
    summary = ray_whisper.transcribe(str(tmp_path / "manifest.csv"), str(tmp_path / "out"))
    acc = summary.account
    assert set(acc["phases_s"]) == {name for name, _ in PHASES}  # the actor reported every moment
    assert sum(acc["phases_s"].values()) == pytest.approx(summary.wall_s, abs=0.5)
    assert all(v >= 0 for v in acc["phases_s"].values()), acc["phases_s"]
    assert acc["model_actors"] >= 1 and all(s > 0 for s in acc["model_load_s"])
    assert 0 < acc["model_phase_busy_s"] <= acc["model_busy_s"] and acc["model_batches"] >= 1
    tally = acc["tally"]
    assert 3 <= tally["chunks"] <= tally["encoder_windows"] and tally["decoder_steps"] > tally["chunks"]
    marker = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert marker["summary"]["account"]["tally"] == tally  # what benchmarks/throughput.py reads
