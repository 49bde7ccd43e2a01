"""Driver memory and orchestration throughput against the manifest's length: does the head node's memory stay flat?

    python benchmarks/scale.py --rows 10000 100000 --max-seconds 90

For each length N, writes one tiny silent WAV and N hard links to it (the disk holds one file's bytes; every
row is still a distinct path, as a real manifest's are), a CSV manifest of those N rows, and runs
`ray-whisper transcribe manifest.csv out/` in a fresh process, sampling the driver's RSS (psutil, the CLI's
own process: Ray's daemons and workers are other processes) and the progress line's file count every 0.1 s.
A run still going --max-seconds after its first file was saved (or past --max-files) is stopped with
SIGINT, as Ctrl-C would, and extrapolated: its files/s over the running part gives the full run's time, and the driver's RSS
against files done (a least-squares line) gives the RSS at the last file.

Prints, per length: the driver's RSS once planning is over (manifest read, output scanned, dataset built: the
first file done), its peak, the extrapolated peak, and orchestration throughput in files per second per core
(silent files: the decode tasks read and chunk them, the model sees no chunk; what is measured is Ray Data,
the stages' wiring and the driver). Across lengths: bytes of driver memory per manifest row (the slope of
the extrapolated peak). Nothing here is a test: the machine's load changes the throughput.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROGRESS = re.compile(r"files done: (\d+)/(\d+)")
LINKS_PER_FOLDER = 10_000
MAX_START_S = 300.0  # a run that saves no file for this long is stopped too


def make_rows(folder: Path, n: int, seconds: float = 0.5) -> Path:
    """`n` hard links to a tiny silent WAV (one copy of it per LINKS_PER_FOLDER links: ext4 allows 65,000 links
    to a file) and manifest.csv naming each."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    if manifest.exists() and sum(1 for _ in manifest.open()) == n + 1:
        return manifest
    silence = io.BytesIO()
    with wave.open(silence, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(int(seconds * 16000), "<i2").tobytes())
    with manifest.open("w") as f:
        f.write("id,audio\n")
        for i in range(n):
            sub = folder / "audio" / f"{i // LINKS_PER_FOLDER:04d}"
            if i % LINKS_PER_FOLDER == 0:
                sub.mkdir(parents=True, exist_ok=True)
                (sub / "silence.wav").write_bytes(silence.getvalue())
            link = sub / f"s{i:07d}.wav"
            if not link.exists():
                os.link(sub / "silence.wav", link)
            f.write(f"s{i:07d},{link}\n")
    return manifest


class Sampler:
    """The driver's RSS and the progress line's file count, every `interval_s`."""

    def __init__(self, proc: subprocess.Popen, interval_s: float = 0.1):
        import psutil

        self.process = psutil.Process(proc.pid)
        self.samples: list[tuple[float, int, int]] = []  # (seconds since start, rss bytes, files done)
        self.files = 0
        self.first_file_s: float | None = None
        self.started = time.monotonic()
        self._interval = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while True:
            try:
                rss = self.process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return
            self.samples.append((time.monotonic() - self.started, rss, self.files))
            time.sleep(self._interval)

    def saw(self, files: int) -> None:
        if files and self.first_file_s is None:
            self.first_file_s = time.monotonic() - self.started
        self.files = max(self.files, files)

    def join(self) -> None:
        self._thread.join(timeout=5)


def run(manifest: Path, out: Path, max_seconds: float, max_files: int, extra: list[str]) -> dict:
    """One CLI run, stopped with SIGINT `max_seconds` after its first file is saved, past `max_files`, or once
    it has taken MAX_START_S without saving one."""
    env = dict(os.environ, RAY_WHISPER_PROGRESS_INTERVAL_S="1")
    cmd = [sys.executable, "-c", "import sys; from ray_whisper.cli import main; sys.exit(main())",
           "transcribe", str(manifest), str(out), "--overwrite", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    sampler = Sampler(proc)
    stopped = False
    tail: list[str] = []

    def watch() -> None:
        nonlocal stopped
        while proc.poll() is None:
            elapsed = time.monotonic() - sampler.started
            running = elapsed - sampler.first_file_s if sampler.first_file_s is not None else 0.0
            if not stopped and (running > max_seconds or elapsed > MAX_START_S + max_seconds
                                or (max_files and sampler.files >= max_files)):
                proc.send_signal(signal.SIGINT)
                stopped = True
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for line in proc.stderr:
        tail = (tail + [line.rstrip()])[-20:]
        m = PROGRESS.search(line)
        if m:
            sampler.saw(int(m.group(1)))
    proc.wait()
    wall = time.monotonic() - sampler.started
    sampler.join()
    if proc.returncode not in (0, 130):
        raise RuntimeError(f"ray-whisper exited {proc.returncode}:\n" + "\n".join(tail))
    return summarise(sampler, wall, stopped, proc.returncode)


def summarise(sampler: Sampler, wall: float, stopped: bool, code: int) -> dict:
    samples = np.array(sampler.samples, dtype=float).reshape(-1, 3)
    t, rss, files = samples[:, 0], samples[:, 1], samples[:, 2]
    running = files > 0
    done = int(sampler.files)
    first = sampler.first_file_s
    start_rss = float(rss[running][0]) if running.any() else float(rss.max())
    rate = (done - files[running][0]) / (t[running][-1] - t[running][0]) if running.sum() > 10 and t[running][-1] > t[running][0] else 0.0
    slope = float(np.polyfit(files[running], rss[running], 1)[0]) if running.sum() > 10 and np.ptp(files[running]) else 0.0
    return {"exit": code, "stopped_early": stopped, "files_done": done, "wall_s": round(wall, 1),
            "first_file_s": round(first, 1) if first else None, "start_rss": start_rss, "peak_rss": float(rss.max()),
            "files_per_s": round(rate, 1), "rss_per_file_during_run": round(slope, 1)}


def driver_start(manifest: str, out: str) -> None:
    """What the driver does before the first decode task, in this process: read the manifest, scan the output,
    start Ray, build the manifest's Dataset (pipeline.manifest_rows, as transcribe does)."""
    import ray

    from ray_whisper.batch.pipeline import manifest_rows
    from ray_whisper.io.manifest import read_manifest
    from ray_whisper.io.output import OutputDir

    table = read_manifest(manifest)
    todo, _ = OutputDir.open(out).begin(table, "scale", overwrite=True, retry_errors=False)
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    manifest_rows(todo, 4)
    ray.shutdown()


def measure_start(n: int, work: Path) -> dict:
    """The driver's peak RSS over its start only (driver_start in a fresh process), for lengths too long to run."""
    manifest = make_rows(work / f"rows-{n}", n)
    proc = subprocess.Popen([sys.executable, __file__, "--driver-start", str(manifest), str(work / f"rows-{n}" / "out")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sampler = Sampler(proc)
    proc.wait()
    sampler.join()
    return {"rows": n, "start_only": True, "wall_s": round(time.monotonic() - sampler.started, 1),
            "peak_rss": float(max(r for _, r, _ in sampler.samples))}


def measure(n: int, work: Path, max_seconds: float, max_files: int, extra: list[str]) -> dict:
    manifest = make_rows(work / f"rows-{n}", n)
    result = run(manifest, work / f"rows-{n}" / "out", max_seconds, max_files, extra)
    remaining = n - result["files_done"]
    result["rows"] = n
    result["files_per_s_per_core"] = round(result["files_per_s"] / (os.cpu_count() or 1), 1)
    result["full_run_s"] = round(result["wall_s"] + remaining / result["files_per_s"], 0) if result["files_per_s"] else None
    result["extrapolated_peak_rss"] = max(result["peak_rss"], result["peak_rss"] + max(0.0, result["rss_per_file_during_run"]) * remaining)
    return result


def main() -> None:
    from benchmarks.machine import cpu, describe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--max-seconds", type=float, default=90.0,
                   help="stop a run (SIGINT) this long after its first file is saved, and extrapolate")
    p.add_argument("--max-files", type=int, default=0, help="stop a run once this many files are done (0: never)")
    p.add_argument("--work", type=Path, default=Path("/tmp/ray_whisper-scale"), help="folder for the links and outputs")
    p.add_argument("--json", type=Path, help="write the results here as well")
    p.add_argument("--start-only", type=int, nargs="*", default=[],
                   help="lengths whose driver start alone is measured (manifest, output scan, Ray, Dataset)")
    p.add_argument("--driver-start", nargs=2, metavar=("MANIFEST", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="more ray-whisper transcribe flags, after --")
    args = p.parse_args()
    if args.driver_start:
        return driver_start(*args.driver_start)
    machine = cpu()
    print(describe(machine))
    results = [measure(n, args.work, args.max_seconds, args.max_files, args.extra) for n in args.rows]
    mb = 1 << 20
    print(f"{'rows':>9} {'done':>8} {'start MB':>9} {'peak MB':>8} {'extrap. MB':>10} {'B/file run':>10} "
          f"{'files/s':>8} {'/core':>6} {'full run s':>10}")
    for r in results:
        print(f"{r['rows']:>9} {r['files_done']:>8} {r['start_rss'] / mb:>9.0f} {r['peak_rss'] / mb:>8.0f} "
              f"{r['extrapolated_peak_rss'] / mb:>10.0f} {r['rss_per_file_during_run']:>10.0f} {r['files_per_s']:>8.1f} "
              f"{r['files_per_s_per_core']:>6.1f} {r['full_run_s'] or 0:>10.0f}")
    slopes = []
    for a, b in itertools.pairwise(results):
        per_row = (b["extrapolated_peak_rss"] - a["extrapolated_peak_rss"]) / (b["rows"] - a["rows"])
        start_per_row = (b["start_rss"] - a["start_rss"]) / (b["rows"] - a["rows"])
        slopes.append({"from": a["rows"], "to": b["rows"], "peak_bytes_per_row": round(per_row),
                       "start_bytes_per_row": round(start_per_row)})
        print(f"{a['rows']} -> {b['rows']} rows: driver peak {per_row:.0f} B per row "
              f"(at the first file: {start_per_row:.0f} B per row)")
    starts = [measure_start(n, args.work) for n in args.start_only]
    for r in starts:
        print(f"{r['rows']} rows, the driver's start only: peak RSS {r['peak_rss'] / mb:.0f} MB ({r['wall_s']:.0f} s)")
    for a, b in itertools.pairwise(starts):
        print(f"{a['rows']} -> {b['rows']} rows, start only: {(b['peak_rss'] - a['peak_rss']) / (b['rows'] - a['rows']):.0f} B per row")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": results, "slopes": slopes, "starts": starts},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
