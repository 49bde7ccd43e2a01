"""Ray Data wiring only: manifest -> chunk rows (CPU tasks) -> token rows (model actors) -> one row per file
-> Parquet.

Everything that can be checked is checked on the driver first (options, manifest, model, output), so a
mistake fails in a second, before any worker starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import tokenizers

from . import schema, storage
from .assemble import merge_file
from .config import StorageOptions, TranscribeOptions
from .errors import ConfigError
from .manifest import read_manifest
from .model import model_files, resolve_model
from .output import OutputDir, new_run_id
from .preprocess import chunk_batch
from .report import Summary, summarize
from .resources import Resources, plan_resources
from .tokens import language_code, special_tokens

log = logging.getLogger(__name__)


def connect(dashboard: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS when set (ray job submit sets it), else start a local Ray (with its
    dashboard only when asked: on a small machine it takes ~2.5 s of start-up and CPU from the model)."""
    import ray  # ~1 s: imported when a run starts, not when the CLI parses its flags

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, log_to_driver=True, **({} if address else {"include_dashboard": dashboard}))


@dataclass(frozen=True)
class Prepared:
    """What the driver resolved before any worker starts."""

    manifest: pa.Table
    model_path: str
    model_config: dict[str, Any]  # its config.json
    tokenizer_json: str  # serialized fast tokenizer, so the merge stage needs no transformers
    storage: StorageOptions  # resolved: the driver's endpoint and region, for every worker

    @property
    def n_mels(self) -> int:
        return int(self.model_config.get("num_mel_bins", 80))


def prepare(manifest: str, options: TranscribeOptions, output: OutputDir | None = None) -> Prepared:
    """Driver-side checks and resolution that need no cluster: manifest, output (checked writable before the
    model is fetched, so a wrong bucket fails in seconds), model, languages."""
    opt = options.decoding
    storage_options = options.storage.resolved()
    table = read_manifest(manifest, storage.filesystem(manifest, storage_options))
    if output is not None:
        output.check_writable()
    model_path = resolve_model(opt.model, opt.revision)
    config, generation, tokenizer_json = model_files(model_path, opt.revision)
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    tokens = special_tokens(tokenizer.token_to_id, generation, int(config["vocab_size"]))
    try:
        language_code(opt.language, tokens)
        for lang in set(table[schema.LANGUAGE].drop_null().to_pylist()):
            language_code(lang, tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if opt.task == "translate" and not tokens.multilingual:
        raise ConfigError(f"--task translate needs a multilingual model; {opt.model} is English-only")
    return Prepared(table, model_path, config, tokenizer_json, storage_options)


def build_dataset(manifest: str | Prepared, options: TranscribeOptions | None = None, **overrides: Any):
    """The lazy Ray Dataset of output rows (schema.OUTPUT_SCHEMA), one per manifest row, for users who
    compose their own pipeline. Nothing runs until the dataset is consumed."""
    import ray
    import ray.data

    options = (options or TranscribeOptions()).replace(**overrides)
    prepared = manifest if isinstance(manifest, Prepared) else prepare(manifest, options)
    connect(options.run.dashboard)
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    res = plan_resources(options.resources, ray.cluster_resources(), node_cpus, prepared.model_config)

    table = prepared.manifest
    step = options.resources.files_per_task
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
            fn_kwargs={"geom": options.chunks.geometry(), "n_mels": prepared.n_mels, "storage_options": prepared.storage},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=1,
            max_retries=3,  # a decode worker that dies (OOM kill, node loss) is retried on another
        )
        # whole batches: chunks arrive in blocks of one decode task's files (1 to ~40 chunks); cut and joined
        # into blocks of exactly one batch, the model never runs a ragged batch of 2 where 16 fit
        chunks = chunks.repartition(target_num_rows_per_block=res.batch_size, strict=True)
        tokens = _model_stage(chunks, prepared, options, res)
    # a few partitions: each is a task to schedule (~0.5 s of a small machine's CPU); 8 on an autoscaling
    # cluster that starts with no CPU
    cpus = int(ray.cluster_resources().get("CPU", 0))
    partitions = max(1, min(table.num_rows, 2 * cpus if cpus else 8))
    return tokens.groupby(schema.ID, num_partitions=partitions).map_groups(
        merge_file,
        fn_kwargs={"tokenizer_json": prepared.tokenizer_json, "model_name": options.decoding.model},
        batch_format="numpy",
    )


def _model_stage(chunks: Any, prepared: Prepared, options: TranscribeOptions, res: Resources) -> Any:
    import ray.data

    from .inference import Transcriber  # torch and the network: the driver never needs them

    return chunks.map_batches(
        Transcriber,
        fn_constructor_kwargs={
            "model_path": prepared.model_path, "options": options.decoding, "cpu_threads": res.cpu_threads,
        },
        batch_size=res.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        num_gpus=res.gpus_per_actor,
        num_cpus=res.cpus_per_actor,
        max_restarts=-1,  # a dead model actor is replaced...
        max_task_retries=-1,  # ...and the batches it held are retried on the pool
    )


def transcribe(manifest: str, output: str, options: TranscribeOptions | None = None, **overrides: Any) -> Summary:
    """Transcribe every row of `manifest` into Parquet under `output`; returns the run's summary.

    Options are a TranscribeOptions, keywords (`batch_size=16`), or both. Rows already in `output` with status
    ok are skipped (resume); see output.py for the layout.
    """
    started = time.perf_counter()
    options = (options or TranscribeOptions()).replace(**overrides)
    out = OutputDir.open(output, options.storage.resolved())
    prepared = prepare(manifest, options, out)
    todo = out.begin(prepared.manifest, overwrite=options.run.overwrite, retry_errors=options.run.retry_errors)
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
    table = out.complete(prepared.manifest, run_id, options.decoding.model)
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
