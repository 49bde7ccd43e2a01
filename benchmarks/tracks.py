"""What watching a file's other audio tracks costs the decode: streaming decode time of a long AAC mp4 with one
audio track against the same file with two, where the transcribed track speaks (the other is decoded only until
a frame of it is loud) and where both are silent (the other decoded whole: the worst case).

    python benchmarks/tracks.py --minutes 10

Prints CPU seconds per file (best of --repeats, the files alternated) and each against the one-track file,
as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_whisper.constants import SAMPLE_RATE  # noqa: E402
from ray_whisper.io.audio import decode_all, decode_stream  # noqa: E402
from machine import cpu, describe  # noqa: E402


def write(path: Path, tracks: list[np.ndarray]) -> Path:
    """An mp4 with one mono AAC track per array (16 kHz float samples)."""
    with av.open(str(path), "w", format="mp4") as out:
        streams = [out.add_stream("aac", rate=SAMPLE_RATE, layout="mono") for _ in tracks]
        for stream, x in zip(streams, tracks):
            for start in range(0, x.size, 4096):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, start : start + 4096]),
                                                   format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return path


def cpu_seconds(data: bytes) -> float:
    """CPU time of one streaming decode: on a shared machine, wall time measures the neighbours."""
    started = time.process_time()
    for _ in decode_stream(data, notes=[]):
        pass
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    jfk = decode_all((ROOT / "tests" / "data" / "jfk.flac").read_bytes())
    speech = np.tile(jfk, int(np.ceil(args.minutes * 60 * SAMPLE_RATE / jfk.size)))[: int(args.minutes * 60 * SAMPLE_RATE)]
    quiet = np.zeros_like(speech)
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "one track": write(Path(tmp) / "one.mp4", [speech]),
            "two tracks, the transcribed one speaks": write(Path(tmp) / "two.mp4", [speech, speech]),
            "two tracks, both silent": write(Path(tmp) / "silent.mp4", [quiet, quiet]),
        }
        data = {name: path.read_bytes() for name, path in files.items()}
        times = {name: float("inf") for name in files}
        for _ in range(args.repeats):  # alternated, best of each: drift hits every file alike
            for name in files:
                times[name] = min(times[name], cpu_seconds(data[name]))
    base = times["one track"]
    print(json.dumps({"machine": describe(cpu()), "minutes": args.minutes,
                      "cpu_seconds": {k: round(v, 3) for k, v in times.items()},
                      "against one track": {k: round(v / base, 2) for k, v in times.items()}}, indent=1))


if __name__ == "__main__":
    main()
