"""The batch job's driver CPU, now that the driver assembles the files and writes the parts (batch/assemble.py,
fed by pipeline._collect): the driver process's CPU seconds (its own getrusage: Ray's workers, raylet and GCS
are other processes), the part of them spent assembling and writing (Assembler.add and .flush, timed on their
thread), and the driver's share of the machine's cores over the run's wall time.

    python benchmarks/driver_cpu.py --files 48 --seconds 11

Files are copies of tests/data/jfk.flac (11 s of real speech; --seconds above 11 repeats it); the local Ray
gets every core. The result names the machine (benchmarks/machine.py) and is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(method, spent: list[float]):
    def wrapper(*args, **kwargs):
        start = time.thread_time()
        try:
            return method(*args, **kwargs)
        finally:
            spent[0] += time.thread_time() - start
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=11.0, help="length of each file (jfk.flac, repeated)")
    parser.add_argument("--flush-interval-s", type=float, default=30.0)
    args = parser.parse_args()

    import numpy as np
    import ray

    import ray_whisper
    from ray_whisper.asr.evaluation import write_wav
    from ray_whisper.batch.assemble import Assembler
    from ray_whisper.io.audio import decode_all

    jfk = decode_all((ROOT / "tests/data/jfk.flac").read_bytes())
    audio = np.tile(jfk, int(np.ceil(args.seconds * 16_000 / len(jfk))))[: int(args.seconds * 16_000)]
    spent = [0.0]
    Assembler.add, Assembler.flush = timed(Assembler.add, spent), timed(Assembler.flush, spent)
    with tempfile.TemporaryDirectory() as work:
        wav = write_wav(Path(work) / "speech.wav", audio)
        manifest = Path(work) / "m.csv"
        manifest.write_text("id,audio\n" + "".join(f"f{i},{wav}\n" for i in range(args.files)))
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
        before, started = cpu_s(), time.perf_counter()
        summary = ray_whisper.transcribe(str(manifest), str(Path(work) / "out"), flush_interval_s=args.flush_interval_s)
        wall, driver = time.perf_counter() - started, cpu_s() - before
        parts = len(list((Path(work) / "out").glob("part-*.parquet")))
        ray.shutdown()
    from machine import cpu, describe

    cores = os.cpu_count() or 1
    print(json.dumps({
        "machine": describe(cpu()), "files": args.files, "seconds_each": args.seconds, "files_ok": summary.files_ok,
        "parts": parts, "wall_s": round(wall, 1), "driver_cpu_s": round(driver, 2),
        "assemble_and_write_cpu_s": round(spent[0], 3), "assemble_ms_per_file": round(1000 * spent[0] / args.files, 2),
        "driver_share_of_cores": round(driver / (wall * cores), 4),
        "assemble_share_of_cores": round(spent[0] / (wall * cores), 5),
    }, indent=1))


if __name__ == "__main__":
    main()
