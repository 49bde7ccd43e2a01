"""The same resident Whisper online: an OpenAI-compatible transcription endpoint on Ray Serve.

    ray-whisper serve --port 8000             # or: serve run ray_whisper.serve:app
    POST /v1/audio/transcriptions  (and /v1/audio/translations)   multipart: file, model, language, prompt,
         response_format (json, text, srt, vtt, verbose_json), temperature, timestamp_granularities[]
    GET  /health (each replica's figures), GET /ready (503 with the reason while no replica takes work):
         answered by Serve's proxy from the replicas' reports (health.py), never queued behind audio
    GET  /-/healthz (Serve's proxy alive: the liveness probe)

A request's audio is decoded and cut into chunks by the batch job's own functions (io.audio, asr.chunking);
its chunks join the chunks of every other request in flight in one queue (queue.BatchQueue), drained in
batches whenever the model is free through the one engine (asr.engine.Engine); its transcript is the same
merge of its chunks (asr.merge.merge_file), written in the export's formats (protocol.respond). Bad input is
an OpenAI-style JSON error (400 a malformed form or a bad field, 404/405 a wrong path or method, 408 an upload
slower than --upload-timeout-s, 413 too large, 503 + Retry-After refused under load or while draining
(admission.Gate), 500 a model failure), with the request id; it never takes the replica down.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time
import asyncio
import collections
import dataclasses
import hashlib
import logging
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..asr.chunking import ChunkGeometry, chunk_seed, is_silent, iter_chunks
from ..asr.engine import Engine
from ..asr.features import log_mel
from ..asr.merge import NOTHING, ChunkTranscript, merge_file
from ..asr.tokens import detects_file_language
from ..config import ChunkOptions, DecodingOptions, ServeOptions, parse_text
from ..constants import SAMPLE_RATE
from ..errors import ConfigError, FileError
from ..io.audio import decode_all
from ..model.checkpoint import Checkpoint, resolve_model
from ..model.resources import auto_batch_size, model_actor_options, torch_threads
from . import health as probes
from .admission import Gate, clear_drain, default_held, drain, watch_drain
from .protocol import ApiError, Fields, RequestId, read_fields, respond, schedule
from .proxy import CALLBACK, IMPORT_PATH
from .queue import BatchQueue, Expired

log = logging.getLogger(__name__)
__all__ = ["Service", "app", "build", "clear_drain", "drain", "openai_errors_in_the_proxy", "replica_warning"]

api = FastAPI(title="ray_whisper", description="Whisper on Ray Serve, compatible with OpenAI's audio API")
# measured with benchmarks/serve.py --replicas 1|2 (docs/performance.md, "Replicas per node")
REPLICA_RULE = ("on CPU one replica per node, with torch on all its cores: on 2 cores, 2 replicas of 1 thread "
                "answered 0.51-0.84x the files/s of 1 replica of 2 threads (docs/performance.md)")


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """A wrong path or method in OpenAI's error shape (FastAPI's own is {"detail": ...})."""
    param = {404: "path", 405: "method"}.get(e.status_code)
    message = {404: f"no route {request.url.path}; the API is POST /v1/audio/transcriptions and "
                    "/v1/audio/translations, GET /health and /ready",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
    reply = ApiError(e.status_code, message, param).response(RequestId.of(request))
    reply.headers.update(getattr(e, "headers", None) or {})  # 405's Allow
    return reply


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    first = (e.errors() or [{}])[0]
    return ApiError(400, str(first.get("msg", e)), ".".join(map(str, first.get("loc", ())[1:])) or None
                    ).response(RequestId.of(request))


@dataclass
class Job:
    """One chunk of one request, waiting in the shared queue."""

    feats: np.ndarray  # (n_mels, 3000)
    duration: float
    language: str | None
    prompt: str | None
    seed: int
    variant: tuple  # the decoding options that differ per request (task, temperatures, words)


class Service:
    """The replica: the engine resident, the routes of `api`, and the shared queue of chunks."""

    def __init__(self, model_path: str, model_name: str, decoding: DecodingOptions, chunks: ChunkOptions,
                 options: ServeOptions, cpu_threads: int = 1):
        self.engine = Engine(model_path, decoding, cpu_threads=cpu_threads)
        self.model_name, self.options, self.geom = model_name, options, ChunkGeometry.of(chunks)
        self.audio_track = chunks.audio_track
        self.decoding = decoding
        # automatic: as the batch job's model actors size theirs (at most 16 on CPU), for the device this replica got
        size = options.max_batch_size or auto_batch_size(self.engine.device == "cuda", self.engine.checkpoint.config,
                                                          online=True)
        self.queue: BatchQueue[Job] = BatchQueue(self._decode_batch, size, options.batch_wait_timeout_s,
                                                 options.queue_timeout_s)
        self.gate = Gate(options.max_queued_requests or default_held(size), options.max_uploads, self._retry_after)
        self.batches = self.chunks = 0
        self.recent: collections.deque[int] = collections.deque(maxlen=32)  # sizes of the last batches
        self.seconds: collections.deque[float] = collections.deque(maxlen=8)  # times of the last batches
        self.prompt_window = int(self.engine.checkpoint.config.get("max_target_positions", 448)) // 2 - 1
        self.started = time.time()
        self.app_name, self.replica = _replica_names()
        self._watch: asyncio.Task | None = None
        # the probes' figures, published for Serve's proxy to answer from (inside Serve only)
        self.reporter = probes.Reporter(self.app_name, self.replica, self.report) if self.app_name else None

    def report(self) -> dict[str, Any]:
        """This replica's figures since it started, and whether it takes new requests (health.py publishes it)."""
        try:
            retry = self._retry_after()
        except RuntimeError:  # the batch times changed under a reporting thread: the next report has them
            retry = 1.0
        return {"model": self.model_name, "replica": self.replica, "pid": os.getpid(),
                "up_s": round(time.time() - self.started, 1), "batches": self.batches, "chunks": self.chunks,
                "recent_batch_sizes": list(self.recent), "max_batch_size": self.queue.max_batch_size,
                "queued_chunks": self.queue.waiting, "held_requests": self.gate.held, "max_held": self.gate.max_held,
                "uploads": self.gate.reading, "max_uploads": self.gate.max_uploads,
                "refused": self.gate.refused, "draining": self.gate.deadline is not None,
                "unready": self.gate.unready(), "retry_after_s": retry, "time": time.time()}

    @api.get("/health")
    async def health(self, request: Request) -> Response:
        """This replica's figures, in the shape Serve's proxy answers for all of them (health.py); reached
        only where the proxy does not answer the probes itself (`serve run` without proxy.CALLBACK set)."""
        self._watching()
        status, body = probes.health([self.report()], time.time())
        return JSONResponse(body, status_code=status, headers=RequestId.of(request).headers())

    @api.get("/ready")
    async def ready(self, request: Request) -> Response:
        """Readiness: 200 while this replica takes new requests, else 503 with the reason."""
        self._watching()
        status, body, retry = probes.ready([self.report()], time.time())
        if status != 200:
            return ApiError(503, body["reason"], None, "server_error", retry).response(RequestId.of(request))
        return JSONResponse(body, headers=RequestId.of(request).headers())

    @api.post("/v1/audio/transcriptions")
    async def transcriptions(self, request: Request) -> Response:
        return await self._answer(request, "transcribe")

    @api.post("/v1/audio/translations")
    async def translations(self, request: Request) -> Response:
        if not self.engine.tokens.multilingual:
            return ApiError(400, f"{self.model_name} is English-only: translation needs a multilingual model",
                            "model").response(RequestId.of(request))
        return await self._answer(request, "translate")

    async def _answer(self, request: Request, task: str) -> Response:
        rid = RequestId.of(request)
        self._watching()
        try:
            async with self.gate.upload():
                fields = await self._read(request)
            async with self.gate.hold():
                return await self.gate.until_cutoff(self._work(fields, task, rid))
        except ApiError as e:
            return e.response(rid)
        except ClientDisconnect:  # gone mid-upload: nothing decoded, nothing to answer
            log.info("request %s: the client went away before its upload finished", rid.value)
            return Response(status_code=499)
        except Expired as e:
            return ApiError(503, f"the server is overloaded: this request {e}; try again later (--queue-timeout-s)",
                            None, "server_error", self._retry_after()).response(rid)
        except Exception:
            log.exception("request %s failed in the model", rid.value)
            return ApiError(500, f"the model failed on this request (request id {rid.value}); try again, and "
                            "report the id if it persists", None, "server_error").response(rid)

    async def _read(self, request: Request) -> Fields:
        try:
            return await asyncio.wait_for(read_fields(request, self.options, self.engine.tokens),
                                          self.options.upload_timeout_s)
        except TimeoutError as e:
            raise ApiError(408, f"the upload took longer than {self.options.upload_timeout_s:g} s "
                           "(--upload-timeout-s); send the whole body at once", "file") from e

    async def _work(self, fields: Fields, task: str, rid: RequestId) -> Response:
        words = fields.words or self.decoding.word_timestamps
        variant = (task, schedule(fields.temperature, self.decoding), words)
        notes: list[str] = []  # an upload's audio tracks left out or silent (io.tracks), as a batch row's warning
        transcript, decoded = await self._transcribe(fields, variant, notes)
        warning = {"x-audio-warning": "; ".join(notes).encode("ascii", "replace").decode()} if notes else {}
        headers = rid.headers(**self._prompt_cut(fields), **warning)
        return respond(transcript, decoded, fields, task, words, self.engine.text, headers)

    def _prompt_cut(self, fields: Fields) -> dict[str, str]:
        """A prompt longer than the model's prompt window is cut to its last tokens, as Whisper does; the
        response says so in a header rather than failing a request OpenAI would take."""
        n = len(self.engine.prompt_ids(fields.prompt) or []) if fields.prompt else 0
        if n <= self.prompt_window:
            return {}
        return {"x-prompt-truncated": f"the prompt's {n} tokens were cut to its last {self.prompt_window}"}

    def _retry_after(self) -> float:
        """About when a refused client could be taken: the batches ahead of it, at the recent batch time."""
        batch_s = statistics.mean(self.seconds) if self.seconds else 1.0
        ahead = max(1, -(-self.gate.held // self.queue.max_batch_size))
        return min(60.0, max(1.0, batch_s * ahead))

    def _watching(self) -> None:
        """The drain watch, started in the loop that serves the requests (inside Serve only)."""
        if self.app_name and (self._watch is None or self._watch.done()):
            self._watch = asyncio.get_running_loop().create_task(watch_drain(self.gate, self.app_name, self.replica))

    async def _transcribe(self, fields: Fields, variant: tuple,
                          notes: list[str]) -> tuple[Any, list[tuple[Any, ChunkTranscript | None]]]:
        """The upload (its --audio-track; warnings into `notes`) decoded, cut and sent through the shared queue
        chunk by chunk, then merged: its transcript, and each chunk with what it decoded to (None: silent)."""
        try:
            audio = await asyncio.to_thread(decode_all, fields.audio, self.audio_track, notes)
        except FileError as e:
            raise ApiError(400, f"the file is not audio that can be decoded ({e.kind}: {e}); send wav, mp3, flac, "
                           "ogg, m4a, webm or mp4", "file") from e
        pieces = list(iter_chunks([audio], self.geom))
        # off the model thread: features queued behind the batch decoding there would miss the next batch
        feats = await asyncio.to_thread(log_mel, [a for _, a in pieces], self.engine.n_mels)
        audible = [k for k, (_, a) in enumerate(pieces) if not is_silent(a)]
        source = hashlib.sha256(fields.audio).hexdigest()  # seeds of the upload's chunks, as a file's are
        jobs = {k: Job(feats[k], pieces[k][1].size / SAMPLE_RATE, fields.language, fields.prompt,
                       chunk_seed(source, k), variant) for k in audible}
        results: dict[int, ChunkTranscript] = {}
        language = fields.language or self.decoding.language
        if audible and detects_file_language(self.engine.tokens, language, self.decoding.language_per_chunk):
            first = audible[0]  # the upload's language, detected once, on its first chunk with sound
            results[first] = await self.queue.submit(jobs[first])
            for k in audible[1:]:
                jobs[k].language = results[first].language
        rest = [k for k in audible if k not in results]
        for k, result in zip(rest, await asyncio.gather(*(self.queue.submit(jobs[k]) for k in rest))):
            results[k] = result
        chunks = [c for c, _ in pieces]
        transcript = merge_file(chunks, [results.get(k, NOTHING) for k in range(len(chunks))], self.engine.text)
        return transcript, [(c, results.get(k)) for k, c in enumerate(chunks)]

    async def _decode_batch(self, jobs: list[Job]) -> list[ChunkTranscript]:
        """The shared queue's consumer: the chunks of every request in flight, decoded together (one call per
        decoding variant among them), on the model's own thread so that requests keep arriving meanwhile."""
        self.batches, self.chunks = self.batches + 1, self.chunks + len(jobs)
        self.recent.append(len(jobs))
        started = time.monotonic()
        out: list[Any] = [None] * len(jobs)
        for variant in {j.variant for j in jobs}:
            picked = [i for i, j in enumerate(jobs) if j.variant == variant]
            task, temperatures, words = variant
            group = [jobs[i] for i in picked]
            decoded = await asyncio.wrap_future(self.engine.submit(
                self.engine.transcribe, np.stack([j.feats for j in group]), [j.language for j in group],
                [j.duration for j in group], [j.prompt for j in group], [j.seed for j in group],
                task=task, temperatures=temperatures, word_timestamps=words,
            ))
            for i, result in zip(picked, decoded):
                out[i] = result
        self.seconds.append(time.monotonic() - started)
        if self.reporter:  # published before the batch's requests are answered: their next /health counts them
            await asyncio.to_thread(self.reporter.now)
        return out


def _replica_names() -> tuple[str | None, str]:
    """This replica's application and tag inside Serve; (None, "local <pid>") outside it."""
    try:
        context = serve.get_replica_context()
        return context.app_name, str(context.replica_tag)
    except Exception:  # noqa: BLE001 - Serve raises RayServeException outside a replica
        return None, f"local {os.getpid()}"


# Decorated here rather than at the class: Ray pickles the ingress wrapper it makes by value, and its base class
# must stay importable by name (Service) so that the methods run against this module's own globals.
WhisperService = serve.deployment(serve.ingress(api)(Service), name="WhisperService")


def build(decoding: DecodingOptions | None = None, chunks: ChunkOptions | None = None,
          options: ServeOptions | None = None) -> Any:
    """The Serve application for these options (the model resolved here, on the driver, so a bad one fails
    before any replica starts)."""
    import ray

    decoding, chunks, options = decoding or DecodingOptions(), chunks or ChunkOptions(), options or ServeOptions()
    path = resolve_model(decoding.model, decoding.revision)
    checkpoint = Checkpoint.load(path, decoding.revision)  # its files readable, here rather than in every replica
    cluster = ray.cluster_resources() if ray.is_initialized() else {}
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    gpus = options.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    actor_options = model_actor_options(decoding.dtype, gpus, "--gpus-per-replica")
    # on CPU a replica runs torch on its share of the node's cores, as the batch job's model actors do
    threads = torch_threads(options.cpus_per_replica, node_cpus or [cluster.get("CPU", 1)], options.max_replicas)
    warning = replica_warning(options.min_replicas, gpus, node_cpus or [cluster.get("CPU", 1)], cluster.get("GPU", 0))
    if warning:
        log.warning(warning)
    # admission is the replica's (admission.Gate); Serve's slots leave room for it to refuse and for health probes.
    # Serve's own queue in front of them is bounded as a backstop only: it counts requests still being routed, so
    # a bound as tight as ours would refuse (in plain text) requests that a replica would take
    size = options.max_batch_size or auto_batch_size(gpus > 0, checkpoint.config)
    held = options.max_queued_requests or default_held(size)
    options = dataclasses.replace(options, max_queued_requests=held)
    slots = options.max_ongoing_requests or held + options.max_uploads + 32
    scaling = {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas}
    return WhisperService.options(
        ray_actor_options={"num_gpus": gpus, "num_cpus": options.cpus_per_replica, **actor_options},
        autoscaling_config=scaling if options.max_replicas > options.min_replicas else None,
        num_replicas=None if options.max_replicas > options.min_replicas else options.min_replicas,
        max_ongoing_requests=slots, max_queued_requests=slots * options.max_replicas,
        # Serve's own drain (a replica scaled down or the app deleted) waits as long as ours
        graceful_shutdown_timeout_s=options.drain_timeout_s + 5, graceful_shutdown_wait_loop_s=0.5,
    ).bind(path, decoding.model, decoding, chunks, options, threads)


def openai_errors_in_the_proxy() -> None:
    """Have Serve's proxy answer its own errors (a replica lost mid-request, its queue full) in OpenAI's shape
    (proxy.py). Called before Ray starts: a local Ray's proxies inherit this environment; on a cluster,
    set RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=ray_whisper.serve.proxy:middlewares in its nodes' environment."""
    os.environ.setdefault(CALLBACK, IMPORT_PATH)


def replica_warning(replicas: int, gpus: float, node_cpus: list[float], cluster_gpus: float) -> str | None:
    """Why `replicas` is more than this cluster can use, or None. On CPU: one replica per node, running torch on
    all its cores (REPLICA_RULE: a second replica on the same node splits its cores and its batches); on GPUs,
    one replica per `gpus` share of the cluster's GPUs."""
    if gpus > 0:
        useful = int(cluster_gpus // gpus) if cluster_gpus else replicas
        rule = f"{gpus:g} GPU(s) per replica and {cluster_gpus:g} GPU(s) in the cluster"
    else:
        nodes = [c for c in node_cpus if c > 0]
        useful = max(1, len(nodes))
        rule = (f"{REPLICA_RULE}; the cluster has {len(nodes)} node(s) with CPUs "
                f"({', '.join(f'{c:g}' for c in nodes)})")
    if replicas <= useful:
        return None
    return (f"--min-replicas {replicas} is more than this cluster can use ({useful}: {rule}). Use --min-replicas "
            f"{useful}{'' if gpus > 0 else ', or add nodes'}.")


def app(args: dict[str, str] | None = None) -> Any:
    """`serve run ray_whisper.serve:app [option=value ...]`: the application, options by their flag names."""
    given = {k.replace("-", "_"): v for k, v in (args or {}).items()}
    classes = (DecodingOptions, ChunkOptions, ServeOptions)
    unknown = sorted(set(given) - {f.name for cls in classes for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown option(s) for ray_whisper.serve:app: {', '.join(unknown)} (it takes "
                          "`ray-whisper serve --help`'s options as name=value, e.g. max_batch_size=8)")
    groups = [cls(**{f.name: parse_text(cls, f.name, given[f.name]) for f in dataclasses.fields(cls) if f.name in given})
              for cls in classes]
    return build(*groups)
