"""Ray Data wiring only: manifest -> chunk rows (CPU) -> token rows (model actors) -> one row per file -> Parquet.

Everything that can be checked is checked on the driver first (options, manifest, model, output), so a
mistake fails in a second, before any worker starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from . import schema, storage
from .config import ConfigError, TranscribeOptions
from .manifest import read_manifest
from .storage import StorageOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """The actor pool and batch geometry chosen for the cluster at hand."""

    batch_size: int
    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    cpu_threads: int  # torch threads of a model actor running on CPU


# Automatic batch size: as many windows as fit these bytes of decoder cross-attention cache (the memory a
# batch holds through its whole decoding), up to the cap. Larger batches share each decoder step's weight
# reads (tiny.en on 2 CPU cores: 16 windows decode 1.57x faster per window than 8, 32 only 1.16x more).
BATCH_MEMORY = {"cpu": (2 << 30, 16), "gpu": (8 << 30, 32)}


def auto_batch_size(gpu: bool, model_config: dict[str, Any] | None) -> int:
    """Windows per model call for a model (its transformers config.json) on a GPU (fp16) or CPU (fp32)."""
    budget, cap = BATCH_MEMORY["gpu" if gpu else "cpu"]
    if not model_config:
        return cap
    per_window = (  # keys and values, every decoder layer, 1500 encoder positions
        2 * int(model_config["decoder_layers"]) * int(model_config.get("max_source_positions", 1500))
        * int(model_config["d_model"]) * (2 if gpu else 4)
    )
    return max(1, min(cap, budget // per_window))


def plan_resources(
    options: TranscribeOptions,
    cluster: dict[str, float],
    node_cpus: list[float] | None = None,
    model_config: dict[str, Any] | None = None,
) -> Resources:
    """Fill in the automatic options from the cluster's resources and the model's size (pure: tested
    without Ray).

    `node_cpus` lists the CPUs of each node. A model actor on CPU reserves --cpus-per-actor for Ray's
    accounting (so decode tasks always find a CPU) but runs torch on its share of the node: on a 2-core
    machine one actor with 2 threads is 1.4x faster than with 1, and decode work is light enough to interleave."""
    gpus = float(cluster.get("GPU", 0))
    gpus_per_actor = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if gpus_per_actor > 0 and gpus == 0:
        # An autoscaling cluster starts GPU nodes for pending actors; it must be told the pool size.
        if options.max_actors is None:
            raise ConfigError(
                f"--gpus-per-actor {gpus_per_actor} asks for GPUs, but the cluster has none (on an autoscaling "
                "cluster whose GPU nodes start at zero, also give --max-actors)"
            )
        log.warning("the cluster has no GPU yet: model actors wait until the autoscaler adds GPU nodes")
    if options.max_actors is not None:
        max_actors = options.max_actors
    elif gpus_per_actor > 0:
        max_actors = max(options.min_actors, int(math.floor(gpus / gpus_per_actor + 1e-9)))
    else:
        max_actors = options.min_actors
    batch_size = options.batch_size or auto_batch_size(gpus_per_actor > 0, model_config)
    nodes = [c for c in (node_cpus or [cluster.get("CPU", 1)]) if c > 0] or [1.0]
    actors_per_node = max(1, math.ceil(max_actors / len(nodes)))
    cpu_threads = max(math.ceil(options.cpus_per_actor), int(min(nodes)) // actors_per_node, 1)
    return Resources(batch_size, options.min_actors, max_actors, gpus_per_actor, options.cpus_per_actor, cpu_threads)


def connect(dashboard: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS when set (ray job submit sets it), else start a local Ray (with its
    dashboard only when asked: on a small machine it takes ~2.5 s of start-up and CPU from the model)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, log_to_driver=True, **({} if address else {"include_dashboard": dashboard}))


@dataclass(frozen=True)
class Prepared:
    manifest: pa.Table
    model_path: str
    model_config: dict[str, Any]  # its config.json
    tokenizer_json: str  # serialized fast tokenizer, so the merge stage needs no transformers
    storage: StorageOptions

    @property
    def n_mels(self) -> int:
        return int(self.model_config.get("num_mel_bins", 80))


def split_options(
    options: TranscribeOptions | None, storage_options: StorageOptions | None, overrides: dict[str, Any]
) -> tuple[TranscribeOptions, StorageOptions]:
    """Apply keyword overrides to whichever option object owns each name; unknown names are an error."""

    options = options or TranscribeOptions()
    storage_options = storage_options or StorageOptions()
    mine = {f.name for f in dataclasses.fields(TranscribeOptions)}
    theirs = {f.name for f in dataclasses.fields(StorageOptions)}
    unknown = set(overrides) - mine - theirs
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}; see `ray-whisper transcribe --help`")
    options = options.replace(**{k: v for k, v in overrides.items() if k in mine})
    storage_options = dataclasses.replace(storage_options, **{k: v for k, v in overrides.items() if k in theirs})
    return options, storage_options.resolved()  # endpoint/region from the driver's env, for every worker


def prepare(
    manifest: str, options: TranscribeOptions, storage_options: StorageOptions | None = None, output: Any = None
) -> Prepared:
    """Driver-side checks and resolution that need no cluster: manifest, output (an OutputDir, checked
    writable before the model is fetched, so a wrong bucket fails in seconds), model, language."""
    from .inference import language_code, special_tokens
    from .model import model_files, resolve_model

    table = read_manifest(manifest, storage.filesystem(manifest, storage_options))
    if output is not None:
        output.check_writable()
    model_path = resolve_model(options.model, options.revision)
    config, generation, tokenizer_json = model_files(model_path, options.revision)
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    tokens = special_tokens(tokenizer.token_to_id, generation, int(config["vocab_size"]))
    try:
        language_code(options.language, tokens)
        for lang in set(table[schema.LANGUAGE].drop_null().to_pylist()):
            language_code(lang, tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if options.task == "translate" and not tokens.multilingual:
        raise ConfigError(f"--task translate needs a multilingual model; {options.model} is English-only")
    return Prepared(table, model_path, config, tokenizer_json, storage_options or StorageOptions())


def build_dataset(
    manifest: str | Prepared,
    options: TranscribeOptions | None = None,
    storage_options: StorageOptions | None = None,
    **overrides: Any,
):
    """The lazy Ray Dataset of output rows (schema.OUTPUT_SCHEMA), one per manifest row, for users who
    compose their own pipeline. Nothing runs until the dataset is consumed."""
    import ray
    import ray.data

    from .postprocess import merge_file
    from .preprocess import chunk_batch

    options, storage_options = split_options(options, storage_options, overrides)
    prepared = manifest if isinstance(manifest, Prepared) else prepare(manifest, options, storage_options)
    connect(options.dashboard)
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    res = plan_resources(options, ray.cluster_resources(), node_cpus, prepared.model_config)
    geom = options.geometry()

    table = prepared.manifest
    step = options.files_per_task
    context = ray.data.DataContext.get_current()
    # A block whose task fails for good (a file that kills its worker every time) is skipped, not fatal:
    # its rows come back from no worker and OutputDir.complete() gives them `lost` error rows.
    context.max_errored_blocks = -1
    # The merge's shuffle carries only tokens (KBs per file). Ray's default shuffle (v2) starts aggregator
    # actors when the model stage ends: ~7 s after the last batch on a 2-CPU machine, 0.4 s with pull tasks.
    context.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    files = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
    with warnings.catch_warnings():
        # Ray 2.60 deprecates these retry settings in **ray_remote_args but has no named parameter for them;
        # they are set explicitly so that fault tolerance does not depend on defaults that may change.
        warnings.simplefilter("ignore", DeprecationWarning)
        chunks = files.map_batches(
            chunk_batch,
            fn_kwargs={"geom": geom, "n_mels": prepared.n_mels, "storage_options": prepared.storage},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=1,
            max_retries=3,  # a decode worker that dies (OOM kill, node loss) is retried on another
        )
        # whole batches: windows arrive in blocks of one decode task's files (1 to ~40 windows); cut and joined
        # into blocks of exactly one batch, the model never runs a ragged batch of 2 where 16 fit
        chunks = chunks.repartition(target_num_rows_per_block=res.batch_size, strict=True)
        tokens = _model_stage(chunks, prepared, options, res)
    # a few partitions: each is a task to schedule (~0.5 s of a small machine's CPU); 8 on an autoscaling
    # cluster that starts with no CPU
    cpus = int(ray.cluster_resources().get("CPU", 0))
    partitions = max(1, min(table.num_rows, 2 * cpus if cpus else 8))
    return tokens.groupby(schema.ID, num_partitions=partitions).map_groups(
        merge_file,
        fn_kwargs={"tokenizer_json": prepared.tokenizer_json, "model_name": options.model},
        batch_format="numpy",
    )


def _model_stage(chunks: Any, prepared: Prepared, options: TranscribeOptions, res: Resources) -> Any:
    import ray.data

    from .inference import Transcriber

    return chunks.map_batches(
        Transcriber,
        fn_constructor_kwargs={
            "model_path": prepared.model_path, "options": options, "n_mels": prepared.n_mels,
            "cpu_threads": res.cpu_threads,
        },
        batch_size=res.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        num_gpus=res.gpus_per_actor,
        num_cpus=res.cpus_per_actor,
        max_restarts=-1,  # a dead model actor is replaced...
        max_task_retries=-1,  # ...and the batches it held are retried on the pool
    )


@dataclass
class Summary:
    """What a run did; `str()` is the report printed at the end of the CLI."""

    files_ok: int
    files_failed: int
    audio_s: float
    wall_s: float
    output: str
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    skipped: int = 0  # rows already done by an earlier run (resume)

    @property
    def rtfx(self) -> float:
        """Real-time factor: seconds of audio transcribed per second of wall time."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "files_ok": self.files_ok,
            "files_failed": self.files_failed,
            "audio_hours": round(self.audio_s / 3600, 4),
            "wall_s": round(self.wall_s, 2),
            "rtfx": round(self.rtfx, 2),
            "errors_by_kind": self.errors_by_kind,
            "skipped_already_done": self.skipped,
            "output": self.output,
        }

    def __str__(self) -> str:
        lines = [
            f"files ok: {self.files_ok}   failed: {self.files_failed}",
            f"audio: {self.audio_s / 3600:.3f} h ({self.audio_s:.1f} s)   wall: {self.wall_s:.1f} s   "
            f"real-time factor: {self.rtfx:.1f}x",
        ]
        if self.skipped:
            lines.append(f"resumed: {self.skipped} file(s) were already done and were skipped")
        if self.errors_by_kind:
            lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(self.errors_by_kind.items())))
        lines.append(f"output: {self.output}")
        return "\n".join(lines)


def summarize(table: pa.Table, wall_s: float, output: str, run_id: str = "", skipped: int = 0) -> Summary:
    """Counts over the whole output; audio seconds and throughput over the rows this run wrote."""
    ok = [s == schema.STATUS_OK for s in table["status"].to_pylist()]
    kinds: dict[str, int] = {}
    for good, err in zip(ok, table[schema.ERROR].to_pylist()):
        if not good:
            kind = (err or "unknown").split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    this_run = (
        [f"part-{run_id}-" in p for p in table["_part"].to_pylist()] if run_id and "_part" in table.column_names
        else [True] * table.num_rows
    )
    audio_s = sum(d or 0.0 for d, good, mine in zip(table["duration_s"].to_pylist(), ok, this_run) if good and mine)
    return Summary(sum(ok), len(ok) - sum(ok), audio_s, wall_s, output, kinds, skipped)


def transcribe(
    manifest: str,
    output: str,
    options: TranscribeOptions | None = None,
    storage_options: StorageOptions | None = None,
    **overrides: Any,
) -> Summary:
    """Transcribe every row of `manifest` into Parquet under `output`; returns the run's summary.

    Options are TranscribeOptions / StorageOptions fields, as objects or as keywords (`batch_size=16`).
    Rows already in `output` with status ok are skipped (resume); see output.py for the layout.
    """
    from .output import OutputDir, new_run_id

    started = time.perf_counter()
    options, storage_options = split_options(options, storage_options, overrides)
    out = OutputDir.open(output, storage_options)
    prepared = prepare(manifest, options, storage_options, out)
    todo = out.begin(prepared.manifest, overwrite=options.overwrite, retry_errors=options.retry_errors)
    run_id = new_run_id()
    skipped = prepared.manifest.num_rows - todo.num_rows
    if skipped:
        log.info("resuming: %d of %d rows already in %s", skipped, prepared.manifest.num_rows, output)
    if todo.num_rows:
        ds = build_dataset(dataclasses.replace(prepared, manifest=todo), options)
        ds.write_parquet(
            out.root,
            filesystem=storage.arrow_filesystem(out.fs),
            filename_provider=_PartNames(run_id),
        )
    table = out.complete(prepared.manifest, run_id, options.model)
    summary = summarize(table, time.perf_counter() - started, output, run_id, skipped)
    out.commit(summary.as_dict())
    return summary


class _PartNames:
    """part-<run>-<write uuid>-<task>[-<n>].parquet (Ray appends -<n>): one run's files sort together and
    never collide with another run's (Ray requires the write uuid in the name when appending)."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{self.run_id}-{write_uuid}-{task_index:06}.parquet"

    def get_filename_for_block(self, block: Any, write_uuid: str, task_index: int, block_index: int) -> str:
        return self.get_filename_for_task(write_uuid, task_index)
