"""The pipeline's decoder from memory on a wider long-file corpus than throughput.py's (whose long files are built
from two recordings): the shared human clips (jfk, both speakers of stereo_diarization.wav, the MIT licence),
each sped 0.9-1.1x at its own gain, interleaved with espeak-ng readings of the GPL-3 text's paragraphs (four
voices, 140-190 words a minute) in 10 files of 1-7 minutes, with pauses of 0-2.5 s between pieces. Prints, per
chunk length, the decoder's wall time, the windows its encoder ran on (first pass, second pass, fallbacks) and
WER. Needs espeak-ng (Debian: apt install espeak-ng); its voice is hard for tiny.en (WER ~28%), so compare
runs with each other, not with throughput.py's.

    python benchmarks/synthetic.py                                   # 45 min, 30 s chunks
    python benchmarks/synthetic.py --minutes 45 --chunk-lengths 30 25 27
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput as tp  # noqa: E402

from ray_whisper.asr import evaluation as ev  # noqa: E402
from ray_whisper.io.audio import decode_all  # noqa: E402
from ray_whisper.config import ChunkOptions  # noqa: E402
from ray_whisper.constants import SAMPLE_RATE  # noqa: E402

LICENSE = Path("/usr/share/common-licenses/GPL-3")  # Debian's copy; any plain-text licence reads the same way
VOICES = ("en-us", "en", "en-us+m3", "en+f3")
FILE_S = (150, 330, 210, 480, 120, 270, 390, 180, 300, 240)  # scaled to --minutes
GAPS_S = (0.0, 0.1, 0.3, 0.6, 1.2, 2.5)


def human_clips() -> list[tuple[np.ndarray, str]]:
    refs = json.loads((ROOT / "tests/data/refs.json").read_text())
    clips = [(tp._channel(ROOT / "tests/data" / name, channel)[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)],
              text or refs[name][key]) for name, channel, key, a, b, text in tp.SHORT_PIECES]
    mit = decode_all((ROOT / "tests/data/multilingual.mp3").read_bytes())[: int(29.5 * SAMPLE_RATE)]
    return clips + [(mit, refs["multilingual.mp3"]["text_en"])]


def synthesized(folder: Path) -> list[tuple[np.ndarray, str]]:
    """The licence's paragraphs read by espeak-ng (lower case: it spells out words in capitals)."""
    if shutil.which("espeak-ng") is None:
        sys.exit("benchmarks/synthetic.py needs espeak-ng (Debian: apt install espeak-ng)")
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in LICENSE.read_text().split("\n\n")]
    paragraphs = [p for p in paragraphs if 80 < len(p) < 700 and not p.isupper() and not p[0].isdigit()]
    speeds = np.random.default_rng(7).integers(140, 190, len(paragraphs))
    out = []
    for i, (text, speed) in enumerate(zip(paragraphs, speeds)):
        wav = folder / f"tts_{i:03d}.wav"
        voice = VOICES[i % len(VOICES)]
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(int(speed)), "-w", str(wav), text.lower()], check=True)
        out.append((decode_all(wav.read_bytes()), text))
    return out


def build(folder: Path, minutes: float) -> tuple[list[Path], list[str], float]:
    human, synth = human_clips(), synthesized(folder)
    rng = np.random.default_rng(7)
    scale = minutes * 60 / sum(FILE_S)
    paths, texts, total = [], [], 0.0
    for f, length in enumerate(FILE_S):
        parts, words, n = [], [], 0
        while n < length * scale * SAMPLE_RATE:
            pool = human if rng.random() < 0.4 else synth
            audio, text = pool[int(rng.integers(len(pool)))]
            speed = float(rng.uniform(0.9, 1.1))
            clip = np.interp(np.arange(0, audio.size - 1, speed), np.arange(audio.size), audio)
            clip = clip * float(rng.uniform(0.4, 1.0))
            gap = np.zeros(int(float(rng.choice(GAPS_S)) * SAMPLE_RATE), np.float32)
            parts += [clip.astype(np.float32), gap]
            words.append(text)
            n += clip.size + gap.size
        audio = np.concatenate(parts)
        audio = (audio + rng.normal(0, 0.002, audio.size)).astype(np.float32)
        paths.append(ev.write_wav(folder / f"long_{f:02d}.wav", audio))
        texts.append(" ".join(words))
        total += audio.size / SAMPLE_RATE
    return paths, texts, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=45.0, help="total audio (default 45)")
    parser.add_argument("--chunk-lengths", type=float, nargs="+", default=[30.0], help="seconds, one run each")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths, refs, total = build(Path(tmp), args.minutes)
        print(f"corpus: {len(paths)} files, {total / 60:.1f} min", flush=True)
        for length in args.chunk_lengths:
            counted: dict[str, int] = {}
            wall, texts = tp.run_decoder(paths, args.threads, ChunkOptions(chunk_length_s=length), counted)
            print(f"chunks of {length:g} s: {wall:.1f} s, {counted['encoder']} encoder passes for {counted['chunks']} "
                  f"chunks, WER {ev.wer(refs, texts):.2%}", flush=True)


if __name__ == "__main__":
    main()
