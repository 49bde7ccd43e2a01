"""The model's dtypes on this CPU, side by side: the engine decoding the same long speech from memory in each
dtype, alternated, with the WER of each. What `--dtype auto` rests on (model.runtime.auto_cpu_dtype).

    python benchmarks/dtypes.py                       # 10 min of real speech, float32 and bfloat16, 2 rounds
    python benchmarks/dtypes.py --minutes 30 --dtypes float32 bfloat16 int8 --rounds 3

Prints the CPU (model and whether it has AMX, AVX512-BF16, AVX2), then per dtype and round the wall time,
RTFx (audio s / wall s) and WER, and the median speed of each dtype relative to float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu, describe  # noqa: E402

from ray_whisper.asr import evaluation as ev  # noqa: E402
from ray_whisper.config import DecodingOptions  # noqa: E402
from ray_whisper.io.audio import decode_all  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="audio built from the real clips (default 10)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "int8"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from ray_whisper.asr.engine import Engine
    from ray_whisper.model.checkpoint import bundled_model_dir

    data = ROOT / "tests" / "data"
    refs = json.loads((data / "refs.json").read_text())
    clips = [(decode_all((data / "jfk.flac").read_bytes()), refs["jfk.flac"]["text"]),
             (decode_all((data / "multilingual.mp3").read_bytes())[: int(29.5 * 16_000)], refs["multilingual.mp3"]["text_en"])]
    audio, reference = ev.build_long_speech(clips, args.minutes * 60, seed=3)
    seconds = audio.size / 16_000
    print(f"{seconds / 60:.1f} min of speech; {describe(cpu())}", flush=True)
    engines = {d: Engine(str(bundled_model_dir()), DecodingOptions(dtype=d), cpu_threads=args.threads) for d in args.dtypes}
    walls: dict[str, list[float]] = {d: [] for d in args.dtypes}
    wers: dict[str, float] = {}
    for k in range(args.rounds):  # alternated, so that drift in the machine's speed hits every dtype alike
        for d, engine in engines.items():
            started = time.perf_counter()
            text, _ = ev.transcribe_in_memory(audio, engine, batch_size=16)
            walls[d].append(time.perf_counter() - started)
            wers[d] = ev.wer([reference], [text])
            print(f"{d:9s} round {k}: {walls[d][-1]:6.1f} s  RTFx {seconds / walls[d][-1]:6.1f}  WER {100 * wers[d]:.2f}%",
                  flush=True)
    base = statistics.median(walls[args.dtypes[0]])
    summary = {d: {"median_s": round(statistics.median(w), 2), "speed_vs_first": round(base / statistics.median(w), 2),
                   "wer": round(wers[d], 4)} for d, w in walls.items()}
    for d, row in summary.items():
        print(f"{d:9s} median {row['median_s']:6.1f} s  {row['speed_vs_first']:.2f}x {args.dtypes[0]}  WER {100 * row['wer']:.2f}%")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu(), "audio_s": seconds, "dtypes": summary}, indent=2))


if __name__ == "__main__":
    main()
