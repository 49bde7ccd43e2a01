"""A decoder step's parts on this CPU: the attention of a few queries over many keys through torch's
scaled_dot_product_attention beside the model's own (model.network._attend_decoder, what the decoder uses on
CPU), the vocabulary product plain and packed for oneDNN, and a whole tiny.en decoder step at batch 16 and
32, in float32, bfloat16 and int8 (--dtype int8: int8 linear layers). What network._attend_decoder and
network.vocabulary_logits rest on.

    python benchmarks/attention.py                 # ~1 min
    python benchmarks/attention.py --threads 4

Prints the CPU (model and whether it has AMX, AVX512-BF16, AVX2), then milliseconds per call, the median of
--repeats timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu, describe  # noqa: E402

SHAPES = [  # (rows, queries, keys): a greedy step's cross- and self-attention, a chunk's 5 beams, prompts, the encoder
    (16, 1, 1500), (16, 1, 224), (4, 5, 1500), (16, 32, 1500), (16, 100, 100), (2, 1500, 1500)]


def ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from ray_whisper.model import int8, network, runtime
    from ray_whisper.model.checkpoint import bundled_model_dir

    torch.set_num_threads(args.threads)
    print(f"machine: {describe(cpu())}; torch {torch.__version__}, {args.threads} threads")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for rows, queries, keys in SHAPES:
            q, k, v = (torch.randn(rows, 6, n, 64, generator=g).to(dtype) for n in (queries, keys, keys))
            torch_ms = ms(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
            own_ms = ms(lambda: network._attend_decoder(q, k, v, None), args.repeats)
            used = "torch's (the encoder)" if queries == 1500 else "own"  # network.Attention.attend
            print(f"{name:8} attention {rows:2} rows x 6 heads x {queries:3} queries over {keys:4} keys: "
                  f"torch {torch_ms:6.2f} ms, own {own_ms:6.2f} ms (the model uses {used})")
        net = network.load(bundled_model_dir(), dtype=dtype)
        h = torch.randn(16, net.dims.d_model, generator=g).to(dtype)
        plain = ms(lambda: F.linear(h, net.proj_out.weight), args.repeats)
        packed = ms(lambda: net.vocabulary_logits(h), args.repeats)
        print(f"{name:8} vocabulary product, 16 rows: plain {plain:.2f} ms, as decoding runs it "
              f"({'packed' if net._packed_out(h) is not None else 'plain'}) {packed:.2f} ms")
        for rows in (1, 16, 32):
            print(f"{name:8} tiny.en decoder step, {rows} rows, 4-44 tokens in: {step_ms(net, rows, g, args.repeats):.1f} ms")
        print(f"{name:8} tiny.en encoder, 8 windows: {encoder_s(net, g):.2f} s")
        if dtype == torch.float32:  # the engine packs float32's linears (asr.engine: runtime.pack_linears)
            for part in ("model.encoder", "model.decoder"):
                runtime.pack_linears(net, part, network.pack_for_onednn)
            for rows in (1, 16, 32):
                print(f"{name:8} tiny.en decoder step, {rows} rows, linears packed: {step_ms(net, rows, g, args.repeats):.1f} ms")
            print(f"{name:8} tiny.en encoder, 8 windows, linears packed: {encoder_s(net, g):.2f} s")
    net = network.load(bundled_model_dir(), dtype=torch.float32)
    int8.quantize_linear(net)  # int8 linear layers (oneDNN's on AMX), float32 activations and attention
    for rows in (16, 32):
        print(f"int8     tiny.en decoder step, {rows} rows, 4-44 tokens in: {step_ms(net, rows, g, args.repeats):.1f} ms")


def encoder_s(net, g) -> float:
    """Seconds of one encoder pass over 8 windows of random features, the median of two after a warm-up."""
    import torch

    mel = torch.randn(8, net.dims.n_mels, 3000, generator=g).to(net.proj_out.weight.dtype)
    with torch.inference_mode():
        return ms(lambda: net.encode(mel), 2) / 1000


def step_ms(net, rows: int, g, repeats: int) -> float:
    """Milliseconds of one decoder step of `rows` rows over random encoder states, the median of whole runs of
    40 steps after the same 4-token prefix."""
    import torch

    dtype = net.proj_out.weight.dtype
    encoded = torch.randn(rows, net.dims.n_audio_ctx, net.dims.d_model, generator=g).to(dtype)
    with torch.inference_mode():
        cache = net.new_cache(encoded, 224)
        net.decode(torch.full((rows, 4), 50257), cache)

        def steps(n: int = 40) -> None:
            cache.length = 4  # the same 40 steps again, after the same 4-token prefix
            for i in range(n):
                net.decode(torch.full((rows, 1), 50300 + i), cache)

        return ms(steps, max(3, repeats // 5)) / 40

if __name__ == "__main__":
    main()
