"""The pipeline's decoder from memory on the varied long-file corpus (benchmarks/varied.py: espeak-ng voices
reading licence texts between the shared human recordings, with noise), one run per chunk length: its wall
time, the windows its encoder ran on (first pass, second pass, fallbacks) and WER. Compare runs with each
other, not with throughput.py's recordings.

    python benchmarks/synthetic.py                                   # 45 min, 30 s chunks
    python benchmarks/synthetic.py --minutes 45 --chunk-lengths 30 25 27
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput as tp  # noqa: E402
import varied  # noqa: E402

from ray_whisper.asr import evaluation as ev  # noqa: E402
from ray_whisper.config import ChunkOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=45.0, help="total audio (default 45)")
    parser.add_argument("--chunk-lengths", type=float, nargs="+", default=[30.0], help="seconds, one run each")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths, refs, total = varied.build(Path(tmp), args.minutes)
        print(f"corpus: {len(paths)} files, {total / 60:.1f} min", flush=True)
        for length in args.chunk_lengths:
            counted: dict[str, int] = {}
            wall, texts = tp.run_decoder(paths, args.threads, ChunkOptions(chunk_length_s=length), counted)
            print(f"chunks of {length:g} s: {wall:.1f} s, {counted['encoder']} encoder passes for {counted['chunks']} "
                  f"chunks, WER {ev.wer(refs, texts):.2%}", flush=True)


if __name__ == "__main__":
    main()
