"""The same resident Whisper online: an OpenAI-compatible transcription endpoint on Ray Serve.

    ray-whisper serve --port 8000             # or: serve run ray_whisper.serve:app
    POST /v1/audio/transcriptions  (and /v1/audio/translations)   multipart: file, model, language, prompt,
         response_format (json, text, srt, vtt, verbose_json), temperature, timestamp_granularities[]
    GET  /health

A request's audio is decoded and cut into chunks by the batch job's own functions (io.audio, asr.chunking);
its chunks join the chunks of every other request in flight in one queue (queue.BatchQueue), drained in
batches whenever the model is free through the one engine (asr.engine.Engine); its transcript is the same
merge of its chunks (asr.merge.merge_file), written in the export's formats (protocol.respond). Bad input is
an OpenAI-style JSON error (400 not audio, 413 too large, 422 a missing or bad field, 500 a model failure,
with the request id); it never takes the replica down.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time
import asyncio
import collections
import dataclasses
import hashlib
import logging
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from starlette.requests import ClientDisconnect

from ..asr.chunking import ChunkGeometry, chunk_seed, is_silent, iter_chunks
from ..asr.engine import Engine
from ..asr.merge import NOTHING, ChunkTranscript, merge_file
from ..asr.tokens import detects_file_language
from ..config import ChunkOptions, DecodingOptions, ServeOptions, option_type
from ..constants import SAMPLE_RATE
from ..errors import ConfigError, FileError
from ..io.audio import decode_all
from ..model.checkpoint import Checkpoint, resolve_model
from ..model.resources import auto_batch_size, model_actor_options, torch_threads
from .protocol import ApiError, Fields, read_fields, request_id, respond, schedule
from .queue import BatchQueue

log = logging.getLogger(__name__)

api = FastAPI(title="ray_whisper", description="Whisper on Ray Serve, compatible with OpenAI's audio API")


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
        self.decoding = decoding
        # automatic: as the batch job's model actors size theirs, for the device this replica really got
        size = options.max_batch_size or auto_batch_size(self.engine.device == "cuda", self.engine.checkpoint.config)
        self.queue: BatchQueue[Job] = BatchQueue(self._decode_batch, size, options.batch_wait_timeout_s)
        self.batches = self.chunks = 0
        self.recent: collections.deque[int] = collections.deque(maxlen=32)  # sizes of the last batches

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        mean = self.chunks / self.batches if self.batches else 0.0
        return {"status": "ok", "model": self.model_name, "batches": self.batches, "chunks": self.chunks,
                "mean_batch_size": round(mean, 2), "recent_batch_sizes": list(self.recent),
                "max_batch_size": self.queue.max_batch_size, "queued_chunks": self.queue.waiting}

    @api.post("/v1/audio/transcriptions")
    async def transcriptions(self, request: Request) -> Response:
        return await self._answer(request, "transcribe")

    @api.post("/v1/audio/translations")
    async def translations(self, request: Request) -> Response:
        if not self.engine.tokens.multilingual:
            return ApiError(400, f"{self.model_name} is English-only: translation needs a multilingual model",
                            "model").response(request_id())
        return await self._answer(request, "translate")

    async def _answer(self, request: Request, task: str) -> Response:
        rid = request_id()
        try:
            fields = await read_fields(request, self.options, self.engine.tokens)
            words = fields.words or self.decoding.word_timestamps
            variant = (task, schedule(fields.temperature, self.decoding), words)
            transcript, decoded = await self._transcribe(fields, variant)
            return respond(transcript, decoded, fields, task, words, self.engine.text, rid)
        except ApiError as e:
            return e.response(rid)
        except ClientDisconnect:  # gone mid-upload: nothing decoded, nothing to answer
            log.info("request %s: the client went away before its upload finished", rid)
            return Response(status_code=499)
        except Exception:
            log.exception("request %s failed in the model", rid)
            return ApiError(500, f"the model failed on this request (request id {rid}); try again, and "
                            "report the id if it persists", None, "server_error").response(rid)

    async def _transcribe(self, fields: Fields, variant: tuple) -> tuple[Any, list[tuple[Any, ChunkTranscript | None]]]:
        """The upload decoded, cut and sent through the shared queue chunk by chunk, then merged: its
        transcript, and each chunk with what it decoded to (None: silent, not decoded)."""
        try:
            audio = await asyncio.to_thread(decode_all, fields.audio)
        except FileError as e:
            raise ApiError(400, f"the file is not audio that can be decoded ({e.kind}: {e}); send wav, mp3, flac, "
                           "ogg, m4a, webm or mp4", "file") from e
        pieces = list(iter_chunks([audio], self.geom))
        feats = await asyncio.wrap_future(self.engine.submit(self.engine.features, [a for _, a in pieces]))
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
        return out


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
    Checkpoint.load(path, decoding.revision)  # its files readable, here rather than in every replica
    cluster = ray.cluster_resources() if ray.is_initialized() else {}
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    gpus = options.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    actor_options = model_actor_options(decoding.dtype, gpus, "--gpus-per-replica")
    # on CPU a replica runs torch on its share of the node's cores, as the batch job's model actors do
    threads = torch_threads(options.cpus_per_replica, node_cpus or [cluster.get("CPU", 1)], options.max_replicas)
    scaling = {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas}
    return WhisperService.options(
        ray_actor_options={"num_gpus": gpus, "num_cpus": options.cpus_per_replica, **actor_options},
        autoscaling_config=scaling if options.max_replicas > options.min_replicas else None,
        num_replicas=None if options.max_replicas > options.min_replicas else options.min_replicas,
        max_ongoing_requests=options.max_ongoing_requests,
    ).bind(path, decoding.model, decoding, chunks, options, threads)


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


BOOLEAN_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_text(cls: type, name: str, value: str) -> Any:
    """Option `name` of group `cls`, given as text (`serve run` arguments), as its type; a word that is not one
    is a ConfigError naming it (a typo must not turn an option silently off)."""
    kind = option_type(typing.get_type_hints(cls)[name])
    if kind is bool:
        if value.lower() not in BOOLEAN_WORDS:
            raise ConfigError(f"{name}={value!r}: expected true or false (or 1/0, yes/no, on/off)")
        return BOOLEAN_WORDS[value.lower()]
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r}: expected a number ({kind.__name__})") from None
    return value
