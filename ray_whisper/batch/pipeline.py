"""Ray Data wiring only: manifest -> chunk rows (CPU tasks) -> token rows (model actors) -> one row per file
-> Parquet.

Everything that can be checked is checked on the driver first (options, manifest, model, output), so a
mistake fails in a second, before any worker starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from .. import schema
from ..io import storage
from .account import account, collect
from .assemble import Assembler
from .cluster import RESUME, connect, stop, watching
from ..config import StorageOptions, TranscribeOptions
from ..errors import ClusterError, ConfigError, Interrupted, OutputError
from ..io.manifest import read_manifest
from ..model.checkpoint import Checkpoint, resolve_model
from ..io.output import OutputDir, new_run_id
from ..io.parts import PartWriter
from .cpu_stage import chunk_batch
from .model_stage import ModelStage
from .report import Progress, Summary, summarize
from ..model.resources import model_actor_options, plan_resources
from ..asr.chunking import ChunkGeometry
from ..asr.tokens import checkpoint_tokens, detects_file_language, language_code

log = logging.getLogger(__name__)

ASSEMBLE_BATCHES = 4  # model batches whose completed files are written as one part
SOURCE_BLOCK_TASKS = 1024  # decode tasks' worth of manifest rows in each block put from the driver


@dataclass(frozen=True)
class Prepared:
    """What the driver resolved before any worker starts."""

    manifest: pa.Table | None  # None: rows come from a user's Dataset (batch.dataset)
    checkpoint: Checkpoint  # the model, resolved; its configs and tokenizer (the merge stage needs no transformers)
    storage: StorageOptions  # resolved: the driver's endpoint and region, for every worker
    detect_language: bool = False  # each file's language detected once (tokens.detects_file_language)
    account_key: str | None = None  # where the model actors report their time (batch.account); None: nowhere


def prepare(manifest: str, options: TranscribeOptions, output: OutputDir | None = None) -> Prepared:
    """Driver-side checks and resolution that need no cluster: manifest, output (checked writable before the
    model is fetched, so a wrong bucket fails in seconds), model, languages."""
    storage_options = options.storage.resolved()
    table = read_manifest(manifest, storage.filesystem(manifest, storage_options))
    if output is not None:
        output.check_writable()
    checkpoint, _, detect = prepare_model(options, set(table[schema.LANGUAGE].drop_null().to_pylist()))
    return Prepared(table, checkpoint, storage_options, detect)


def prepare_model(options: TranscribeOptions, languages: set[str] = frozenset()) -> tuple[Checkpoint, StorageOptions, bool]:
    """The model resolved and its files read on the driver, the options and these languages checked against
    it: (its checkpoint, the resolved storage options, whether each file's language is detected once)."""
    opt = options.decoding
    checkpoint = Checkpoint.load(resolve_model(opt.model, opt.revision), opt.revision)
    tokens = checkpoint_tokens(checkpoint)
    try:
        for lang in {opt.language, *languages}:
            language_code(lang, tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if opt.task == "translate" and not tokens.multilingual:
        raise ConfigError(f"--task translate needs a multilingual model; {opt.model} is English-only")
    return checkpoint, options.storage.resolved(), detects_file_language(tokens, opt.language, opt.language_per_chunk)


def build_dataset(manifest: str | Prepared, options: TranscribeOptions | None = None, **overrides: Any):
    """The lazy Ray Dataset of output rows (schema.OUTPUT_SCHEMA), one per manifest row, for users who
    compose their own pipeline. Nothing runs until the dataset is consumed."""
    options = (options or TranscribeOptions()).replace(**overrides)
    prepared = manifest if isinstance(manifest, Prepared) else prepare(manifest, options)
    connect(options.run.dashboard)
    return _assembled(prepared, options, writer=None)


def _assembled(prepared: Prepared, options: TranscribeOptions, writer: PartWriter | None) -> Any:
    """The manifest's rows -> output rows (no writer), or the model stage's token rows, which the driver
    assembles and writes (with a writer: _collect)."""
    return stages(manifest_rows(prepared.manifest, options.resources.files_per_task), prepared, options, writer)


def manifest_rows(table: pa.Table, files_per_task: int) -> Any:
    """The manifest as a Dataset whose blocks hold `files_per_task` rows each: one decode task per block, and a
    file that kills its worker every time costs only its own block (`lost` rows). The table goes to the object
    store in a few large blocks, cut on the workers as the decode stage takes them (a streaming repartition):
    a block put from the driver costs ~45 KB of driver memory, which at one block per task was 11 KB per row.
    The blocks' metadata is computed here (from_blocks), not in a remote task as from_arrow does: that task
    waited on a worker process while the run's others started, ~0.4 s before the dataset could begin."""
    import ray.data

    size = files_per_task * SOURCE_BLOCK_TASKS
    blocks = [table.slice(i, size) for i in range(0, table.num_rows, size)]
    return _reblock(getattr(ray.data, "from_blocks", ray.data.from_arrow)(blocks), files_per_task)


def _reblock(ds: Any, rows: int) -> Any:
    """`ds` in blocks of exactly `rows` rows (a strict streaming repartition), whose tasks reserve no CPU.
    Ray Data gives a task 1 CPU unless told otherwise, and Dataset.repartition takes no resources: with every
    CPU held by the model actors and by decode tasks, some of them waiting on a slow server, the re-blocking
    of chunks already decoded would queue behind those fetches, and the model would idle until they end (on a
    2-CPU node with one model actor, one fetch that waits stops the run). Cutting and joining Arrow tables is
    light, so these tasks run beside the others. The resources are set on the plan's operator (private in
    Ray 2.60; where it is missing the tasks keep Ray Data's default)."""
    out = ds.repartition(target_num_rows_per_block=rows, strict=True)
    remote_args = getattr(getattr(getattr(out, "_logical_plan", None), "dag", None), "ray_remote_args", None)
    if isinstance(remote_args, dict):
        remote_args["num_cpus"] = 0
    return out


def stages(files: Any, prepared: Prepared, options: TranscribeOptions, writer: PartWriter | None,
           carry: bool = False) -> Any:
    """A Dataset of manifest rows -> chunk rows -> token rows -> output rows (no writer; with `carry`, each
    with the input's other columns pickled beside it). With a writer (the batch job) it ends at the token rows:
    the driver assembles them and writes the parts (_collect), on time as well as by count."""
    import ray.data
    from ray.util.debug import log_once

    res = _plan(prepared, options)
    actor_options = model_actor_options(options.decoding.dtype, res.gpus_per_actor, "--gpus-per-actor")
    run_context(files)
    log_once("ray_data_progress_manager_disabled")  # marks Ray Data's notice that they are off as shown
    with warnings.catch_warnings():
        # Ray 2.60 deprecates these retry settings in **ray_remote_args but has no named parameter for them;
        # they are set explicitly so that fault tolerance does not depend on defaults that may change.
        warnings.simplefilter("ignore", DeprecationWarning)
        chunks = files.map_batches(
            chunk_batch,
            fn_kwargs={"geom": ChunkGeometry.of(options.chunks), "n_mels": prepared.checkpoint.n_mels, "storage_options": prepared.storage,
                       "detect_language": prepared.detect_language, "audio_track": options.chunks.audio_track},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=res.decode_cpus,
            max_retries=3,  # a decode worker that dies (OOM kill, node loss) is retried on another
        )
        # whole batches: chunks arrive in blocks of one decode task's files (1 to ~40 chunks); cut and joined
        # into blocks of exactly one batch, the model never runs a ragged batch of 2 where 16 fit
        chunks = _reblock(chunks, res.batch_size)
        tokens = chunks.map_batches(
            ModelStage,
            fn_constructor_kwargs={
                "model_path": prepared.checkpoint.path, "options": options.decoding, "cpu_threads": res.cpu_threads,
                "account_key": prepared.account_key,
            },
            batch_size=res.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
            num_gpus=res.gpus_per_actor,
            num_cpus=res.cpus_per_actor,
            **actor_options,
            max_restarts=-1,  # a dead model actor is replaced...
            max_task_retries=-1,  # ...and the batches it held are retried on the pool
        )
        if writer is not None:
            return tokens
        return tokens.map_batches(
            Assembler,
            fn_constructor_kwargs={
                "checkpoint": prepared.checkpoint, "model_name": options.decoding.model,
                "fingerprint": options.fingerprint(),
                "word_timestamps": options.decoding.word_timestamps, "carry": carry,
            },
            batch_size=ASSEMBLE_BATCHES * res.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),  # one actor sees every chunk of every file
            num_cpus=0,  # light (a merge is milliseconds): it must not take a CPU from the decode tasks
            max_restarts=-1,
            max_task_retries=-1,
        )


def run_context(ds: Any) -> None:
    """Set a run's Ray Data options on `ds`'s own context, which every stage made from it shares (not on
    DataContext.get_current(): a dataset copies that when it is made, so what is set there after, as this
    used to, never reached the run)."""
    context = ds.context
    # A block whose task fails for good (a file that kills its worker every time) is skipped, not fatal:
    # its rows come back from no worker and OutputDir.complete() gives them `lost` error rows.
    context.max_errored_blocks = -1
    context.enable_progress_bars = False  # Ray Data counts chunks and blocks; report.Progress counts files


def _plan(prepared: Prepared, options: TranscribeOptions) -> Any:
    """The batch size and actor pool for the cluster at hand (resources.plan_resources)."""
    import ray

    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return plan_resources(options.resources, ray.cluster_resources(), node_cpus, prepared.checkpoint.config)


def _assembler(prepared: Prepared, options: TranscribeOptions, writer: PartWriter) -> Assembler:
    """The driver's Assembler for the batch job: a part at least every --flush-interval-s, and after every
    ASSEMBLE_BATCHES model batches' chunks."""
    return Assembler(prepared.checkpoint, options.decoding.model, options.fingerprint(), writer,
                     word_timestamps=options.decoding.word_timestamps, flush_interval_s=options.run.flush_interval_s,
                     flush_chunks=ASSEMBLE_BATCHES * _plan(prepared, options).batch_size)


def transcribe(manifest: str, output: str, options: TranscribeOptions | None = None, **overrides: Any) -> Summary:
    """Transcribe every row of `manifest` into Parquet under `output`; returns the run's summary.

    Options are a TranscribeOptions, keywords (`batch_size=16`), or both. Rows already in `output` are skipped
    (resume); results reach `output` as files finish, so an interrupted run keeps them (see output.py).
    """
    started = time.perf_counter()
    options = (options or TranscribeOptions()).replace(**overrides)
    out = OutputDir.open(output, options.storage.resolved())
    run_id = new_run_id()
    # the manifest and model are checked first: a bad one is named before any lease is taken
    prepared = dataclasses.replace(prepare(manifest, options, out), account_key=run_id)
    with out.held(run_id):  # one writer at a time: another run on `output` stops at once, exit 2 (io/lease.py)
        return _transcribe(prepared, output, options, out, run_id, started)


def _transcribe(prepared: Prepared, output: str, options: TranscribeOptions, out: OutputDir, run_id: str,
                started: float) -> Summary:
    """transcribe() while it holds `out`'s lease."""
    moments = {"started": time.time() - (time.perf_counter() - started)}  # the run's phases (batch.account)
    todo, done = out.begin(prepared.manifest, options.fingerprint(), overwrite=options.run.overwrite,
                           retry_errors=options.run.retry_errors)
    moments["prepared"] = time.time()
    if done.num_rows:
        log.info("resuming: %d of %d rows already in %s", done.num_rows, prepared.manifest.num_rows, output)
    receipts = schema.RECEIPT_SCHEMA.empty_table()
    if todo.num_rows:
        started_ray = connect(options.run.dashboard)
        moments["ray_started"] = time.time()
        try:
            with watching() as lost:
                try:
                    writer = out.writer(run_id)
                    ds = _assembled(dataclasses.replace(prepared, manifest=todo), options, writer)
                    receipts = _collect(ds, _assembler(prepared, options, writer), todo.num_rows, done.num_rows,
                                        output, lost)
                except BaseException as e:
                    if lost() and not isinstance(e, ClusterError):  # Ray's own error about its lost cluster
                        raise ClusterError(f"{lost()}; {RESUME}") from e
                    raise
        except BaseException as e:
            # a local Ray goes with a run that stops early; kept after success, for the next run. A dead
            # cluster is left alone: ray.shutdown() would wait on it (the reaper ends a local one's processes)
            if started_ray and not isinstance(e, ClusterError):
                stop()
            raise
    moments["ran"] = time.time()
    rows = out.complete(prepared.manifest, done, receipts, run_id, options.decoding.model, options.fingerprint())
    summary = summarize(rows, receipts, time.perf_counter() - started, output, done.num_rows)
    moments["ended"] = time.time()
    summary.account = account(moments, collect(run_id) if todo.num_rows else [])
    out.commit(run_id, rows, summary.as_dict())
    return summary


def _collect(ds: Any, assembler: Assembler, total: int, earlier: int, output: str,
             lost: Any = lambda: None) -> pa.Table:
    """Run the dataset of token rows through `assembler`, writing a part whenever one is due (also while the
    model stage is busy: the rows come from a thread of their own) and the rest at the end; progress counts the
    files as their part lands. The first part that could not be written stops the run (OutputError). A
    KeyboardInterrupt (Ctrl-C, SIGTERM, or cluster.watching() when `lost()` says the cluster went away) writes
    what is finished, then stops with a line saying what is saved and how to resume."""
    progress = Progress(total)
    receipts: list[pa.Table] = []

    def write() -> None:
        block = assembler.flush()
        failed = [e for e in block[schema.WRITE_ERROR].to_pylist() if e]
        if failed:
            raise OutputError(
                f"writing to {output} failed: {failed[0]}. The {_saved(receipts)} file(s) finished before are "
                "saved; free space (or fix the permissions) and rerun the same command to transcribe the rest"
            )
        if block.num_rows:
            receipts.append(block)
            progress.update(block)

    try:
        try:
            for batch in _rows(ds, assembler.wait_s, lost):
                if batch is not None:
                    assembler.add(batch)
                if assembler.due():
                    write()
            write()  # the end of the stream: every finished file
        except KeyboardInterrupt:
            write()  # finished files are saved before the line says how many are
            kept = (f"at least {_saved(receipts)} of this run's {total} file(s) are saved in {output}"
                    + (f" (and {earlier} from earlier runs)" if earlier else ""))
            if lost():
                raise ClusterError(f"{lost()}: {kept}; rerun the same command once Ray is up to transcribe the rest") from None
            raise Interrupted(f"interrupted: {kept}; rerun the same command to transcribe the rest") from None
        except (OutputError, ClusterError, Interrupted):
            raise
        except BaseException:
            with contextlib.suppress(Exception):  # keep what finished; the error that stopped the run is the one to show
                write()
            raise
    finally:
        progress.close()
    return pa.concat_tables(receipts) if receipts else schema.RECEIPT_SCHEMA.empty_table()


def _saved(receipts: list[pa.Table]) -> int:
    return sum(r.num_rows for r in receipts)


_END = object()


def _rows(ds: Any, wait_s: Any, lost: Any = lambda: None) -> Iterator[dict[str, Any] | None]:
    """`ds`'s blocks as numpy batches, or None whenever `wait_s()` seconds pass without one, so that the caller
    can write on time while a model batch takes minutes. Ray Data is iterated in a thread of its own; the caller
    keeps the main thread, where Ctrl-C and SIGTERM arrive. When `lost()` says the cluster is gone, the thread is
    not waited for (it is stuck in calls to the dead cluster; it ends with the process)."""
    rows: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                rows.put(item, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            # no prefetch: Ray Data's would hold each block until the next one exists (a stalled model stage
            # would keep the last finished files from the driver)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                if not put(batch):
                    return  # the caller stopped: leaving the loop closes the iterator and Ray Data's executor
            put(_END)
        except BaseException as e:  # raised again in the caller's thread
            put(e)

    thread = threading.Thread(target=produce, daemon=True, name="ray_whisper-rows")
    thread.start()
    try:
        while True:
            try:
                item = rows.get(timeout=max(0.05, wait_s()))
            except queue.Empty:
                yield None
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # a run that stops early: end Ray Data's executor now (its own shutdown; private in Ray 2.60), or the
        # thread would go on reading, and connect again to print Ray's lines, while the driver exits
        if not lost():  # (no `return` here: it would swallow the KeyboardInterrupt that may be passing through)
            with contextlib.suppress(Exception):
                getattr(ds, "_synchronize_progress_bar", lambda: None)()
            thread.join(timeout=10)
