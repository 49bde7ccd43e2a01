"""Peak memory of the decode stage on one long file: does it grow with file length?

    python benchmarks/memory.py --minutes 120

Writes a long 16-bit WAV of real speech (the test clips, looped), then, in a fresh process, runs the
pipeline's CPU stage (fetch, streaming decode, windows, log-mel features) over it the way a decode task
does, discarding the chunk blocks as Ray would after handing them to the object store. Prints the peak
RSS growth against the size of the decoded waveform (float32), which a decode-everything design would
hold at least once.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_long_wav(path: Path, minutes: float) -> float:
    """Loop the shared clips into a WAV, written piece by piece (this process never holds it whole)."""
    sys.path.insert(0, str(ROOT))
    from ray_whisper.io.audio import decode_all
    from ray_whisper.constants import SAMPLE_RATE

    clips = [decode_all((ROOT / "tests/data" / n).read_bytes()) for n in ("jfk.flac", "multilingual.mp3")]
    target = int(minutes * 60 * SAMPLE_RATE)
    written = 0
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        k = 0
        while written < target:
            clip = clips[k % len(clips)][: target - written]
            w.writeframes((np.clip(clip, -1, 1) * 32767).astype("<i2").tobytes())
            written += clip.size
            k += 1
    return written / SAMPLE_RATE


def measure(path: str) -> dict:
    """Run in a fresh process: peak RSS before and after streaming one file through the CPU stage."""
    import pyarrow as pa

    from ray_whisper.asr.chunking import ChunkGeometry
    from ray_whisper.batch.cpu_stage import chunk_batch

    def run(p: str) -> int:
        rows = pa.table({"id": ["x"], "audio": [p], "language": [None]}, schema=pa.schema(
            [("id", pa.string()), ("audio", pa.string()), ("language", pa.string())]))
        windows = 0
        for block in chunk_batch(rows, ChunkGeometry(), 80):
            windows += block.num_rows  # dropped at once, as Ray hands each block to the object store
        return windows

    run(str(ROOT / "tests/data/jfk.flac"))  # warm up: imports, mel filters, torch kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    windows = run(path)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"windows": windows, "peak_before_mb": before / 2**20, "peak_after_mb": after / 2**20}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=120.0, help="length of the synthetic file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.wav"
        seconds = write_long_wav(path, args.minutes)
        out = subprocess.run([sys.executable, __file__, "--measure", str(path)], capture_output=True, text=True,
                             check=True, cwd=ROOT)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(
        audio_minutes=seconds / 60,
        file_mb=seconds * 16_000 * 2 / 2**20,
        waveform_float32_mb=seconds * 16_000 * 4 / 2**20,
        growth_mb=result["peak_after_mb"] - result["peak_before_mb"],
    )
    print(
        f"{result['audio_minutes']:.0f} min file ({result['file_mb']:.0f} MB WAV, {result['windows']} windows): "
        f"peak RSS grew {result['growth_mb']:.0f} MB while decoding; the float32 waveform alone would be "
        f"{result['waveform_float32_mb']:.0f} MB"
    )
    return result


if __name__ == "__main__":
    main()
