"""The same resident Whisper online: an OpenAI-compatible transcription endpoint on Ray Serve.

    ray-whisper serve --port 8000             # or: serve run ray_whisper.serve:app
    POST /v1/audio/transcriptions  (and /v1/audio/translations)   multipart: file, model, language, prompt,
         response_format (json, text, srt, vtt, verbose_json), temperature, timestamp_granularities[]
    GET  /health

A request's audio is decoded and cut into chunks by the pipeline's own functions (audio.py, chunking.py,
features.py); its chunks join the chunks of every other request in flight in one queue, drained in batches
whenever the model is free (batching.BatchQueue) through the pipeline's decoder (inference.Transcriber); its output row is assembled by the
pipeline's merge (assemble.file_row) and written in the export's formats (subtitles.render). Bad input is an
OpenAI-style JSON error (400 not audio, 413 too large, 422 a missing or bad field, 500 a model failure, with
the request id); it never takes the replica down.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time
import asyncio
import collections
import dataclasses
import logging
import math
import typing
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from starlette.requests import ClientDisconnect

from ..asr import features
from .. import schema
from ..batch.assemble import file_row
from ..io.audio import decode_all
from .queue import BatchQueue
from ..asr.chunking import is_silent, iter_chunks
from ..config import ChunkOptions, DecodingOptions, ServeOptions
from ..constants import SAMPLE_RATE
from ..errors import ConfigError, FileError, RayWhisperError
from ..asr.engine import Transcriber, chunk_seed, token_rows
from ..languages import LANGUAGE_NAMES
from ..model.checkpoint import model_files, resolve_model
from ..asr.transcribe import compression_ratio, transcribe_chunks
from ..model.resources import auto_batch_size, model_actor_options
from ..io.subtitles import render
from ..asr.tokens import language_code

log = logging.getLogger(__name__)

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
CODE_NAMES = {code: name for name, code in reversed(list(LANGUAGE_NAMES.items()))}  # "en" -> "english"
api = FastAPI(title="ray_whisper", description="Whisper on Ray Serve, compatible with OpenAI's audio API")


class ApiError(RayWhisperError):
    """An error answered as OpenAI's API answers one: {"error": {"message", "type", "param", ...}}.
    `api_type` is OpenAI's error type ("invalid_request_error", "server_error"), not a row kind."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 api_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.api_type = status, message, param, api_type

    def response(self, request_id: str) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.api_type, "param": self.param, "code": None,
                          "request_id": request_id}}
        return JSONResponse(body, status_code=self.status, headers={"x-request-id": request_id})


@dataclass(frozen=True)
class Fields:
    """A request's form, checked."""

    audio: bytes
    response_format: str
    language: str | None
    prompt: str | None
    temperature: float
    words: bool


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
    """The replica: the model resident, the routes of `api`, and the shared queue of chunks."""

    def __init__(self, model_path: str, model_name: str, decoding: DecodingOptions, chunks: ChunkOptions,
                 options: ServeOptions, cpu_threads: int = 1):
        self.model = Transcriber(model_path, decoding, cpu_threads=cpu_threads)
        self.model_name, self.options, self.geom = model_name, options, chunks.geometry()
        self.decoding = decoding
        self.tokenizer_json = self.model.tokenizer.to_str()
        # automatic: as the batch job's model actors size theirs, for the device this replica really got
        size = options.max_batch_size or auto_batch_size(
            self.model.device == "cuda", model_files(model_path, decoding.revision)[0])
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
        if not self.model.tokens.multilingual:
            return ApiError(400, f"{self.model_name} is English-only: translation needs a multilingual model",
                            "model").response(_request_id())
        return await self._answer(request, "translate")

    async def _answer(self, request: Request, task: str) -> Response:
        request_id = _request_id()
        try:
            fields = await self._fields(request, task)
            row, chunk_info = await self._transcribe(fields, task)
            return self._format(row, chunk_info, fields, task, request_id)
        except ApiError as e:
            return e.response(request_id)
        except ClientDisconnect:  # gone mid-upload: nothing decoded, nothing to answer
            log.info("request %s: the client went away before its upload finished", request_id)
            return Response(status_code=499)
        except Exception:
            log.exception("request %s failed in the model", request_id)
            return ApiError(500, f"the model failed on this request (request id {request_id}); try again, and "
                            "report the id if it persists", None, "server_error").response(request_id)

    async def _fields(self, request: Request, task: str) -> Fields:
        limit = int(self.options.max_upload_mb * 1e6)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
            raise ApiError(413, f"the upload is {int(declared) / 1e6:.1f} MB; this endpoint takes files up to "
                           f"{self.options.max_upload_mb:g} MB (--max-upload-mb)", "file")
        form = await request.form(max_files=1, max_fields=32)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "the 'file' field is required: the audio to transcribe, sent as multipart/form-data",
                           "file")
        data = await upload.read()
        if len(data) > limit:
            raise ApiError(413, f"the file is {len(data) / 1e6:.1f} MB; this endpoint takes files up to "
                           f"{self.options.max_upload_mb:g} MB (--max-upload-mb)", "file")
        fmt = str(form.get("response_format") or "json")
        if fmt not in FORMATS:
            raise ApiError(422, f"response_format {fmt!r} is not one of {', '.join(FORMATS)}", "response_format")
        granularities = set(form.getlist("timestamp_granularities[]") or form.getlist("timestamp_granularities"))
        if granularities - {"word", "segment"}:
            raise ApiError(422, "timestamp_granularities[] takes 'word' and 'segment'", "timestamp_granularities[]")
        if granularities and fmt != "verbose_json":
            raise ApiError(422, "timestamp_granularities[] needs response_format=verbose_json", "timestamp_granularities[]")
        return Fields(data, fmt, self._language(form.get("language"), task), str(form.get("prompt") or "") or None,
                      _temperature(form.get("temperature")), "word" in granularities)

    def _language(self, value: Any, task: str) -> str | None:
        if not value:
            return None
        try:
            return language_code(str(value), self.model.tokens)
        except ValueError as e:
            raise ApiError(422, str(e), "language") from e

    async def _transcribe(self, fields: Fields, task: str) -> tuple[dict[str, Any], list[Any]]:
        try:
            audio = await asyncio.to_thread(decode_all, fields.audio)
        except FileError as e:
            raise ApiError(400, f"the file is not audio that can be decoded ({e.kind}: {e}); send wav, mp3, flac, "
                           "ogg, m4a, webm or mp4", "file") from e
        pieces = list(iter_chunks([audio], self.geom))
        feats = await asyncio.wrap_future(self.model.thread.submit(features.log_mel, [a for _, a in pieces], self.model.n_mels))
        audible = [k for k, (_, a) in enumerate(pieces) if not is_silent(a)]
        variant = (task, _schedule(fields.temperature, self.decoding), fields.words or self.decoding.word_timestamps)
        jobs = {k: Job(feats[k], pieces[k][1].size / SAMPLE_RATE, fields.language, fields.prompt,
                       chunk_seed("request", k), variant) for k in audible}
        results: dict[int, Any] = {}
        if audible and fields.language is None and self.model.tokens.multilingual and not self.decoding.language_per_chunk:
            first = audible[0]  # the request's language, detected once, on its first chunk with sound
            results[first] = await self.queue.submit(jobs[first])
            for k in audible[1:]:
                jobs[k].language = results[first].language
        rest = [k for k in audible if k not in results]
        for k, result in zip(rest, await asyncio.gather(*(self.queue.submit(jobs[k]) for k in rest))):
            results[k] = result
        batch = _chunk_rows(pieces)
        row = file_row(token_rows(batch, results, [None] * len(pieces)), self.tokenizer_json, self.model_name, "",
                       variant[2])
        return row, [(pieces[k][0], results.get(k)) for k in range(len(pieces))]

    async def _decode_batch(self, jobs: list[Job]) -> list[Any]:
        """The shared queue's consumer: the chunks of every request in flight, decoded together (one call per
        decoding variant among them), on the model's own thread so that requests keep arriving meanwhile."""
        self.batches, self.chunks = self.batches + 1, self.chunks + len(jobs)
        self.recent.append(len(jobs))
        out: list[Any] = [None] * len(jobs)
        for variant in {j.variant for j in jobs}:
            picked = [i for i, j in enumerate(jobs) if j.variant == variant]
            task, temperatures, words = variant
            decoder, aligner = self.model.variant(task=task, temperatures=temperatures, word_timestamps=words)
            group = [jobs[i] for i in picked]
            decoded = await asyncio.wrap_future(self.model.thread.submit(
                transcribe_chunks, decoder, np.stack([j.feats for j in group]), [j.language for j in group],
                [j.duration for j in group], self.model._text, [self.model._prompt_ids(j.prompt) for j in group],
                [j.seed for j in group], aligner,
            ))
            for i, result in zip(picked, decoded):
                out[i] = result
        return out

    def _format(self, row: dict[str, Any], chunk_info: list[Any], fields: Fields, task: str, request_id: str) -> Response:
        headers = {"x-request-id": request_id}
        fmt = fields.response_format
        if fmt == "json":
            return JSONResponse({"text": row[schema.TEXT]}, headers=headers)
        if fmt == "text":
            return PlainTextResponse(row[schema.TEXT] + "\n", headers=headers)
        if fmt in ("srt", "vtt"):
            return PlainTextResponse(render(row, fmt), headers=headers)
        body = {"task": "translate" if task == "translate" else "transcribe",
                "language": CODE_NAMES.get(row[schema.LANGUAGE] or "", row[schema.LANGUAGE] or ""),
                "duration": row[schema.DURATION_S], "text": row[schema.TEXT],
                "segments": _segments(row, chunk_info, self.model._text)}
        if fields.words:
            body["words"] = [{"word": w["word"].strip(), "start": w["start"], "end": w["end"]} for w in row[schema.WORDS] or []]
        return JSONResponse(body, headers=headers)


# Decorated here rather than at the class: Ray pickles the ingress wrapper it makes by value, and its base class
# must stay importable by name (Service) so that the methods run against this module's own globals.
WhisperService = serve.deployment(serve.ingress(api)(Service), name="WhisperService")


def _segments(row: dict[str, Any], chunk_info: list[Any], text_of: Any) -> list[dict[str, Any]]:
    """verbose_json's segments: the row's, with the decoding figures of the chunk each one came from."""
    out = []
    for i, seg in enumerate(row[schema.SEGMENTS] or []):
        chunk, result = next(((c, r) for c, r in chunk_info if r is not None and c.start / SAMPLE_RATE <= seg["start"]
                              < c.end / SAMPLE_RATE), (chunk_info[0][0], None))
        text = "".join(text_of(t) for _, _, t in result.segments) if result else ""
        out.append({"id": i, "seek": int(chunk.start / SAMPLE_RATE * 100), "start": seg["start"], "end": seg["end"],
                    "text": seg["text"], "tokens": [], "temperature": result.temperature if result else 0.0,
                    "avg_logprob": result.avg_logprob if result else 0.0, "compression_ratio": compression_ratio(text),
                    "no_speech_prob": result.no_speech_prob if result else 0.0})
    return out


def _chunk_rows(pieces: list[Any]) -> dict[str, list[Any]]:
    """The chunk rows of a request (the columns token_rows and file_row read)."""
    chunks = [c for c, _ in pieces]
    return {
        schema.ID: ["request"] * len(chunks), schema.AUDIO: ["upload"] * len(chunks), schema.LANGUAGE: [None] * len(chunks),
        schema.CHUNK_INDEX: [c.index for c in chunks], schema.IS_LAST: [c.is_last for c in chunks],
        schema.START: [c.start for c in chunks], schema.END: [c.end for c in chunks],
        schema.STRIDE_LEFT: [c.stride_left for c in chunks], schema.STRIDE_RIGHT: [c.stride_right for c in chunks],
        schema.ERROR: [None] * len(chunks), schema.WARNING: [None] * len(chunks),
        schema.DETECT_INDEX: [-1] * len(chunks), schema.PROMPT: [None] * len(chunks),
    }


def _temperature(value: Any) -> float:
    try:
        t = float(value) if value not in (None, "") else 0.0
    except ValueError:
        t = -1.0
    if not 0 <= t <= 1:
        raise ApiError(422, f"temperature must be a number between 0 and 1; got {value!r}", "temperature")
    return t


def _schedule(temperature: float, decoding: DecodingOptions) -> str:
    """OpenAI's meaning: 0 falls back through the usual temperatures; above 0 starts there."""
    if temperature == 0:
        return decoding.temperatures
    return ",".join(str(t) for t in [temperature] + [s for s in decoding.temperature_steps if s > temperature])


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex[:20]}"


def build(decoding: DecodingOptions | None = None, chunks: ChunkOptions | None = None,
          options: ServeOptions | None = None) -> Any:
    """The Serve application for these options (the model resolved here, on the driver, so a bad one fails
    before any replica starts)."""
    import ray

    decoding, chunks, options = decoding or DecodingOptions(), chunks or ChunkOptions(), options or ServeOptions()
    path = resolve_model(decoding.model, decoding.revision)
    cluster = ray.cluster_resources() if ray.is_initialized() else {}
    gpus = options.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    actor_options = model_actor_options(decoding.dtype, gpus, "--gpus-per-replica")
    # on CPU a replica runs torch on its share of the cluster's cores, as the batch job's model actors do
    threads = max(math.ceil(options.cpus_per_replica), int(cluster.get("CPU", 1)) // options.max_replicas, 1)
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
    groups = [cls(**{f.name: _typed(cls, f.name, given[f.name]) for f in dataclasses.fields(cls) if f.name in given})
              for cls in classes]
    return build(*groups)


def _typed(cls: type, name: str, value: str) -> Any:
    """A `serve run` argument (text) as the option's type."""
    hint = typing.get_type_hints(cls)[name]
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    if bool in kinds:
        words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
        if value.lower() not in words:  # a typo must not turn an option silently off
            raise ConfigError(f"{name}={value!r}: expected true or false (or 1/0, yes/no, on/off)")
        return words[value.lower()]
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r}: expected a number ({kind.__name__})") from None
    return value
