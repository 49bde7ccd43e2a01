"""The batch job's option groups: decoding, chunks, resources, the run, object storage."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from ..errors import ConfigError
from .base import BUNDLED_MODEL, _check, _Group, _opt

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
        "(CPU only): the linear layers quantised to int8 at load, each call's input with a scale per row; on a "
        "CPU with AMX through oneDNN with the rest in bfloat16 (1.23x faster-whisper int8 on 92 min of speech, "
        "WER as bfloat16's, but 0.79x bfloat16's speed), elsewhere through torch.ao in float32 (no faster than "
        "bfloat16 on an AVX512-BF16 CPU). Pick it for int8 weights, not for speed (docs/performance.md).",
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
    """Which audio track of a file is read, and where it is cut into the 30-second chunks the encoder sees."""

    title: ClassVar[str] = "audio track and chunks"

    audio_track: int | None = _opt(
        None, "Audio track of each file to transcribe, counting audio tracks only, from 0 (ffmpeg's -map 0:a:N). "
        "Default: the track the container flags as default, else the first. A file with more tracks is ok with an "
        "extra_tracks warning naming the others; a file without track N is a decode_error row.", "N",
    )

    chunk_length_s: float = _opt(30.0, "Longest chunk in seconds (Whisper sees 30 s).")
    stride_length_s: float = _opt(
        0.0, "Overlap in seconds on each side of a cut that found no pause; the overlap is transcribed "
        "twice and stitched at token level. 0 (measured best): cut at the quietest point, no overlap.",
    )
    search_length_s: float = _opt(8.0, "Each cut goes at the quietest 100 ms in the last this-many seconds of a chunk.")

    def __post_init__(self) -> None:
        _check(self.audio_track is None or self.audio_track >= 0, "--audio-track must be >= 0 (0 is the first audio track)")
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
        "(GPU) or 2 GiB (CPU) of decoder cache, at most 32 (large-v3: 32 on GPU, 4 on CPU).",
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
    flush_interval_s: float = _opt(
        30.0, "Finished files are written to OUTPUT_DIR as a part at least this often, in seconds (more often early "
        "in a run: every tenth of the time files have been finishing; and after every 4 model batches): what a "
        "killed run loses beyond the files in flight is at most this much work.",
    )

    def __post_init__(self) -> None:
        _check(math.isfinite(self.flush_interval_s) and self.flush_interval_s > 0,
               "--flush-interval-s must be a number of seconds > 0")


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


