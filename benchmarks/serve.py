"""The endpoint's batching, measured with the real `openai` client:

    python benchmarks/serve.py                      # 16 short clips (2-10 s of real speech)
    python benchmarks/serve.py --files 32 --batch-wait-timeout-s 0.2

1. the ceiling that batching allows on this machine: the model alone, in this process, decoding the clips as
   one batch against one batch per clip (the same decoder the replicas run);
2. the endpoint (a local Ray, one replica): the clips sent one at a time, then all at once; throughput,
   p50/p95 latency, and the mean batch size the replica formed (from GET /health).

Each is run --repeats times (3), the two sides interleaved, and the medians compared: this VM's speed drifts.

Target: concurrent / sequential throughput at least 0.9 of the ceiling's ratio.

    python benchmarks/serve.py --overload 100       # 100 clients at once, one 3-5 s clip each

3. overload: N clients send at once (bounded: each retries a refusal after its Retry-After, at most 20 times,
   within --deadline-s); prints goodput (answered files/s), refusals (and the slowest refusal), and p50/p95 of
   the answered attempts beside a full batch's time in this process. Targets: refusals within 1 s, p95 of the
   answered within 2x a full batch, goodput no lower than the unbounded endpoint's 0.85 files/s (100 clients,
   tiny.en, 2 cores).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_whisper.asr import evaluation as ev  # noqa: E402
from ray_whisper.io.audio import decode_all  # noqa: E402
from ray_whisper.constants import SAMPLE_RATE  # noqa: E402


def clips(n: int, folder: Path) -> list[Path]:
    """n WAV files of 2 to 10 s cut from the test recordings at seeded places."""
    sources = [decode_all((ROOT / "tests/data" / name).read_bytes()) for name in ("jfk.flac", "multilingual.mp3")]
    sources[1] = sources[1][: 29 * SAMPLE_RATE]  # English only
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        src = sources[i % 2]
        length = int(rng.uniform(2, 10) * SAMPLE_RATE)
        start = int(rng.integers(0, max(1, src.size - length)))
        paths.append(ev.write_wav(folder / f"clip{i:03}.wav", src[start : start + length]))
    return paths


def ceiling(paths: list[Path], threads: int, repeats: int) -> dict:
    from ray_whisper.asr import features
    from ray_whisper.config import DecodingOptions
    from ray_whisper.asr.engine import Engine
    from ray_whisper.model.checkpoint import bundled_model_dir

    tr = Engine(str(bundled_model_dir()), DecodingOptions(), cpu_threads=threads)
    audio = [decode_all(p.read_bytes()) for p in paths]
    feats = features.log_mel(audio, tr.n_mels)
    durations = [a.size / SAMPLE_RATE for a in audio]
    tr.transcribe(feats[:2], [None] * 2, durations[:2])  # warm up
    singles, batches = [], []
    for _ in range(repeats):  # interleaved; medians
        started = time.perf_counter()
        for i in range(len(paths)):
            tr.transcribe(feats[i : i + 1], [None], durations[i : i + 1])
        singles.append(time.perf_counter() - started)
        started = time.perf_counter()
        tr.transcribe(feats, [None] * len(paths), durations)
        batches.append(time.perf_counter() - started)
    one_by_one, together = float(np.median(singles)), float(np.median(batches))
    return {"one_at_a_time_s": one_by_one, "one_batch_s": together, "ratio": one_by_one / together}


def health(url: str) -> dict:
    """The replicas' figures (summed over them), as the proxy reports them: at most a fraction of a second old."""
    time.sleep(0.5)
    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
        return json.loads(r.read())


def one_run(mode: str, paths: list[Path], send, url: str) -> dict:
    latencies: list[float] = []
    before = health(url)
    started = time.perf_counter()
    if mode == "sequential":
        for p in paths:
            send(p, latencies)
    else:
        workers = [threading.Thread(target=send, args=(p, latencies)) for p in paths]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    wall = time.perf_counter() - started
    after = health(url)
    batches, chunks = after["batches"] - before["batches"], after["chunks"] - before["chunks"]
    sizes = after["recent_batch_sizes"][-batches:] if batches else []
    print(f"{mode}: {wall:.1f} s, batch sizes {sizes}", flush=True)
    return {"wall_s": wall, "latencies": latencies, "mean_batch_size": chunks / max(batches, 1), "batch_sizes": sizes}


def endpoint(paths: list[Path], wait_s: float, max_batch: int | None, repeats: int, replicas: int = 1) -> dict:
    from openai import OpenAI
    from ray import serve

    from ray_whisper.batch.cluster import connect
    from ray_whisper.config import ChunkOptions, DecodingOptions, ServeOptions
    from ray_whisper.serve.app import build, openai_errors_in_the_proxy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    openai_errors_in_the_proxy()  # as `ray-whisper serve`: the proxy answers probes and refusals
    connect()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = ServeOptions(port=port, max_batch_size=max_batch, batch_wait_timeout_s=wait_s, min_replicas=replicas,
                           max_replicas=replicas)
    serve.run(build(DecodingOptions(), ChunkOptions(), options), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    def send(path: Path, latencies: list[float]) -> None:
        started = time.perf_counter()
        with path.open("rb") as f:
            client.audio.transcriptions.create(model="whisper-1", file=f)
        latencies.append(time.perf_counter() - started)

    send(paths[0], [])  # warm up
    runs: dict[str, list[dict]] = {"sequential": [], "concurrent": []}
    for _ in range(repeats):  # interleaved, so that the VM's drift reaches both modes alike
        for mode in runs:
            runs[mode].append(one_run(mode, paths, send, url))
    result = {}
    for mode, rs in runs.items():
        latencies = [t for r in rs for t in r["latencies"]]
        walls = [r["wall_s"] for r in rs]
        result[mode] = {"wall_s": float(np.median(walls)), "walls_s": walls,
                        "files_per_s": len(paths) / float(np.median(walls)),
                        "p50_s": float(np.percentile(latencies, 50)), "p95_s": float(np.percentile(latencies, 95)),
                        "mean_batch_size": float(np.mean([r["mean_batch_size"] for r in rs])),
                        "batch_sizes": [r["batch_sizes"] for r in rs]}
    serve.shutdown()
    return result


def overload(clients: int, deadline_s: float, folder: Path, held: int | None, unbounded: bool) -> dict:
    """N clients at once against a fresh endpoint (refusals retried after Retry-After); `held`: its
    --max-queued-requests (None: the default); `unbounded`: no admission limit, as before it had one."""
    import requests
    from ray import serve

    from ray_whisper.batch.cluster import connect
    from ray_whisper.config import ServeOptions
    from ray_whisper.serve.app import build, openai_errors_in_the_proxy

    rng = np.random.default_rng(1)
    source = decode_all((ROOT / "tests/data/jfk.flac").read_bytes())
    paths = []
    for i in range(clients):  # 3-5 s of real speech each
        length, start = int(rng.uniform(3, 5) * SAMPLE_RATE), int(rng.integers(0, source.size - 5 * SAMPLE_RATE))
        paths.append(ev.write_wav(folder / f"load{i:03}.wav", source[start : start + length]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    openai_errors_in_the_proxy()
    connect()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    limits = {"max_queued_requests": 100_000, "max_uploads": 100_000} if unbounded else {"max_queued_requests": held}
    serve.run(build(options=ServeOptions(port=port, **limits)), name="bench-overload", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/audio/transcriptions"
    requests.post(url, files={"file": paths[0].open("rb")}, timeout=300)  # warm up
    answered: list[float] = []  # seconds of each answered attempt
    refusals: list[float] = []  # seconds until each refusal
    failed: list[str] = []
    started = time.perf_counter()

    def client(path: Path) -> None:
        for _ in range(20):
            t0 = time.perf_counter()
            try:
                left = max(1.0, deadline_s - (t0 - started))
                reply = requests.post(url, files={"file": path.open("rb")}, timeout=left)
            except requests.RequestException as e:
                failed.append(type(e).__name__)
                return
            if reply.status_code == 200:
                answered.append(time.perf_counter() - t0)
                return
            if reply.status_code not in (429, 503) or time.perf_counter() - started > deadline_s:
                failed.append(str(reply.status_code))
                return
            refusals.append(time.perf_counter() - t0)
            time.sleep(float(reply.headers.get("retry-after", 1)))
        failed.append("gave up after 20 tries")

    threads = [threading.Thread(target=client, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    serve.shutdown()
    return {"clients": clients, "wall_s": wall, "answered": len(answered), "goodput_files_per_s": len(answered) / wall,
            "refusals": len(refusals), "slowest_refusal_s": max(refusals, default=0.0), "failed": failed,
            "refusal_p50_s": float(np.percentile(refusals, 50)) if refusals else None,
            "refusal_p95_s": float(np.percentile(refusals, 95)) if refusals else None,
            "p50_s": float(np.percentile(answered, 50)) if answered else None,
            "p95_s": float(np.percentile(answered, 95)) if answered else None}


def full_batch_s(threads: int, size: int = 16) -> float:
    """One full batch (`size` 3-5 s clips, as many as the endpoint's default batch on CPU) in this process."""
    from ray_whisper.asr import features
    from ray_whisper.asr.engine import Engine
    from ray_whisper.config import DecodingOptions
    from ray_whisper.model.checkpoint import bundled_model_dir

    engine = Engine(str(bundled_model_dir()), DecodingOptions(), cpu_threads=threads)
    source = decode_all((ROOT / "tests/data/jfk.flac").read_bytes())
    audio = [source[i * SAMPLE_RATE // 2 : i * SAMPLE_RATE // 2 + 4 * SAMPLE_RATE] for i in range(size)]
    feats = features.log_mel(audio, engine.n_mels)
    engine.transcribe(feats[:2], [None] * 2, [4.0] * 2)  # warm up
    started = time.perf_counter()
    engine.transcribe(feats, [None] * size, [4.0] * size)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process ceiling")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.05)
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: the endpoint's (automatic)")
    parser.add_argument("--repeats", type=int, default=3, help="sequential and concurrent runs, interleaved; medians")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas of the endpoint (the sizing rule)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the in-process ceiling (replica runs only)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--overload", type=int, default=0, metavar="N", help="only the overload run, N clients")
    parser.add_argument("--deadline-s", type=float, default=600, help="the overload run's bound")
    parser.add_argument("--max-queued-requests", type=int, default=None,
                        help="the overload run's (default: the endpoint's)")
    parser.add_argument("--unbounded", action="store_true", help="the overload run without admission limits")
    args = parser.parse_args(argv)
    if args.overload:
        batch = full_batch_s(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            r = overload(args.overload, args.deadline_s, Path(tmp), args.max_queued_requests, args.unbounded)
        print(f"overload{' (unbounded)' if args.unbounded else ''}, {r['clients']} clients: {r['answered']} answered "
              f"in {r['wall_s']:.1f} s, goodput {r['goodput_files_per_s']:.2f} files/s; {r['refusals']} refusals "
              f"(p50 {r['refusal_p50_s'] or 0:.2f} s, p95 {r['refusal_p95_s'] or 0:.2f} s, slowest {r['slowest_refusal_s']:.2f} s); "
              f"answered p50 {r['p50_s']:.1f} s, p95 {r['p95_s']:.1f} s (a full batch of 16: {batch:.1f} s); "
              f"failed {r['failed'] or 'none'}")
        r["full_batch_s"] = batch
        if args.json:
            args.json.write_text(json.dumps(r, indent=2))
        return r
    with tempfile.TemporaryDirectory() as tmp:
        paths = clips(args.files, Path(tmp))
        limit = {"ratio": float("nan")} if args.no_ceiling else ceiling(paths, args.threads, args.repeats)
        if not args.no_ceiling:
            print(f"ceiling (model alone, {args.files} clips): {limit['one_at_a_time_s']:.1f} s one at a time, "
                  f"{limit['one_batch_s']:.1f} s as one batch: {limit['ratio']:.2f}x", flush=True)
        served = endpoint(paths, args.batch_wait_timeout_s, args.max_batch_size, args.repeats, args.replicas)
    for mode, r in served.items():
        print(f"{mode:>10}: {r['files_per_s']:.2f} files/s, p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, "
              f"mean batch {r['mean_batch_size']:.1f}")
    gain = served["concurrent"]["files_per_s"] / served["sequential"]["files_per_s"]
    share = gain / limit["ratio"]
    print(f"concurrent / sequential (median walls of {args.repeats} runs each): {gain:.2f}x, {share:.2f} of the "
          f"ceiling's {limit['ratio']:.2f}x (target 0.9)")
    result = {"ceiling": limit, **served, "gain": gain, "share_of_ceiling": share,
              "batch_wait_timeout_s": args.batch_wait_timeout_s, "files": args.files, "replicas": args.replicas}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
