"""Every option, defined once: a frozen dataclass checked on construction, on the driver.

The CLI, the Python API and the job entrypoint all build `TranscribeOptions`; the CLI's flags and
`--help` text are generated from the fields below, so help lives next to the field it describes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .model import BUNDLED_MODEL


class ConfigError(ValueError):
    """A bad option; raised on the driver before any Ray work starts. The message says what to change."""


def _opt(default: Any, help: str, group: str = "model", metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "group": group, "metavar": metavar})


@dataclass(frozen=True)
class TranscribeOptions:
    # model and decoding
    model: str = _opt(
        BUNDLED_MODEL,
        "Whisper checkpoint: a Hugging Face id (openai/whisper-large-v3), a local transformers directory, a "
        "local CTranslate2 Whisper directory (converted once), or the offline default 'bundled:tiny.en'.",
        metavar="ID_OR_DIR",
    )
    revision: str | None = _opt(None, "Hub revision (branch, tag or commit) of --model.")
    language: str | None = _opt(
        None, "Spoken language code (en, de, ...) for every file; a manifest 'language' column overrides it "
        "per row. Unset: detected per window by multilingual models, English for .en models.",
    )
    task: Literal["transcribe", "translate"] = _opt("transcribe", "transcribe, or translate into English.")
    timestamps: bool = _opt(
        True, "Decode with Whisper's timestamp tokens: timed segments and far fewer dropped words. "
        "--no-timestamps is faster but gives one segment per window.",
    )
    beam_size: int = _opt(1, "1 = greedy decoding; above 1, beam search with that many beams (slower).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = _opt(
        "auto", "Model precision. auto: float16 on GPU, float32 on CPU."
    )
    no_speech_threshold: float = _opt(
        0.6, "A window whose no-speech probability is above this AND whose mean token log-probability is "
        "below --logprob-threshold is treated as silence (no text).",
    )
    logprob_threshold: float = _opt(-1.0, "See --no-speech-threshold.")
    max_new_tokens: int = _opt(224, "Most tokens decoded per 30 s window (Whisper's own limit is 224).")

    # windows
    chunk_length_s: float = _opt(30.0, "Longest window in seconds (Whisper sees 30 s).", "windows")
    stride_length_s: float = _opt(
        0.0, "Overlap in seconds on each side of a cut that found no pause; the overlap is transcribed "
        "twice and stitched at token level. 0 (measured best): cut at the quietest point, no overlap.",
        "windows",
    )
    search_length_s: float = _opt(
        8.0, "Each cut goes at the quietest 100 ms in the last this-many seconds of a window.", "windows"
    )

    # Ray resources
    batch_size: int | None = _opt(
        None, "Windows per model call (chunks of many files share a batch). Default: as many as fit 8 GiB "
        "(GPU) or 2 GiB (CPU) of decoder cache, at most 32 on GPU and 16 on CPU (large-v3: 32 / 4).",
        "resources",
    )
    min_actors: int = _opt(1, "Smallest size of the model actor pool (autoscaling lower bound).", "resources")
    max_actors: int | None = _opt(
        None, "Largest size of the model actor pool. Default: as many as the cluster's GPUs allow "
        "(GPUs / --gpus-per-actor), or 1 on a CPU-only cluster.", "resources",
    )
    gpus_per_actor: float | None = _opt(
        None, "GPUs per model actor; 0.5 packs two small models on one GPU. Default: 1 when the cluster "
        "has GPUs, else 0 (CPU).", "resources",
    )
    cpus_per_actor: float = _opt(1.0, "CPUs reserved by each model actor.", "resources")
    files_per_task: int = _opt(
        4, "Manifest rows per decode task; smaller spreads decoding wider, larger cuts overhead.", "resources"
    )

    # the run
    retry_errors: bool = _opt(
        False, "Rerun the files whose rows in OUTPUT_DIR ended in error (a rerun always skips rows that are ok).",
        "run",
    )
    overwrite: bool = _opt(False, "Delete the results already in OUTPUT_DIR and start over.", "run")
    dashboard: bool = _opt(
        False, "Start the Ray dashboard (http://127.0.0.1:8265) with the local Ray instance; it costs ~2.5 s "
        "of start-up and some CPU. Ignored when joining a cluster (RAY_ADDRESS), which has its own.", "run",
    )
    allow_partial: bool = _opt(
        False, "Exit 0 even when some files failed (their rows say why). Default: exit 1 if any row is an error.",
        "run",
    )

    def __post_init__(self) -> None:
        _check(self.beam_size >= 1, "--beam-size must be >= 1")
        _check(self.max_new_tokens >= 1, "--max-new-tokens must be >= 1")
        _check(0 < self.chunk_length_s <= 30, "--chunk-length-s must be in (0, 30]: Whisper sees 30 s at most")
        _check(
            0 < self.search_length_s < self.chunk_length_s,
            "--search-length-s must be positive and shorter than --chunk-length-s",
        )
        _check(
            0 <= 4 * self.stride_length_s < self.chunk_length_s - self.search_length_s,
            f"--stride-length-s {self.stride_length_s} is too long: 4 strides must fit in "
            "--chunk-length-s minus --search-length-s",
        )
        _check(self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.min_actors >= 1, "--min-actors must be >= 1")
        _check(
            self.max_actors is None or self.max_actors >= self.min_actors,
            f"--max-actors ({self.max_actors}) must be >= --min-actors ({self.min_actors})",
        )
        _check(
            self.gpus_per_actor is None or 0 <= self.gpus_per_actor <= 8,
            "--gpus-per-actor must be between 0 and 8",
        )
        _check(self.cpus_per_actor > 0, "--cpus-per-actor must be > 0")
        _check(self.files_per_task >= 1, "--files-per-task must be >= 1")
        _check(0 <= self.no_speech_threshold <= 1, "--no-speech-threshold must be a probability in [0, 1]")
        _check(math.isfinite(self.logprob_threshold), "--logprob-threshold must be a finite number")
        _check(
            self.language is None or self.language.replace(" ", "").isalpha(),
            f"--language {self.language!r} is not a language code such as en, de, haw",
        )
        for f in dataclasses.fields(self):
            choices = _choices(f.name)
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{_flag(f.name)} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")

    def geometry(self) -> Any:
        """The windows these options ask for, as chunking.ChunkGeometry (in samples)."""
        from .chunking import ChunkGeometry

        return ChunkGeometry.from_seconds(self.chunk_length_s, self.stride_length_s, self.search_length_s)

    def replace(self, **changes: Any) -> "TranscribeOptions":
        return dataclasses.replace(self, **changes)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _choices(name: str) -> tuple[Any, ...]:
    hint = get_type_hints(TranscribeOptions)[name]
    return get_args(hint) if get_origin(hint) is Literal else ()


def add_arguments(parser: Any, cls: type = TranscribeOptions) -> None:
    """Add one flag per field of `cls` to an argparse parser, grouped, with the field's help text."""
    import argparse

    hints = get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        group_name = f.metadata.get("group", "options")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        help_text = f.metadata.get("help", "")
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if get_origin(hint) is Literal:
                kwargs["choices"] = get_args(hint)
            else:
                base = [a for a in get_args(hint) if a is not type(None)] or [hint]
                kwargs["type"] = base[0] if base[0] in (int, float) else str
            if f.metadata.get("metavar"):
                kwargs["metavar"] = f.metadata["metavar"]
        default = f.default
        kwargs["help"] = f"{help_text} (default: {default})" if default is not None else help_text
        group.add_argument(f"--{_flag(f.name)}", **kwargs)


def from_namespace(ns: Any, cls: type = TranscribeOptions) -> Any:
    """Build `cls` from the parsed flags that `add_arguments` defined (unset flags keep the defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})
