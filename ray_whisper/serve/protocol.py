"""OpenAI's audio API as the endpoint speaks it: the request's form checked into Fields, errors in OpenAI's
JSON shape, and a transcript written in the response format asked for. No model here."""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time
import math
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from ..asr.chunking import Chunk
from ..asr.merge import ChunkTranscript, FileTranscript
from ..asr.tokens import SpecialTokens, language_code
from ..asr.transcribe import compression_ratio
from ..config import DecodingOptions, ServeOptions
from ..constants import SAMPLE_RATE
from ..errors import RayWhisperError
from ..io.subtitles import render
from ..languages import LANGUAGE_NAMES

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MAX_FIELDS = 32  # a transcription form has 8 fields; more is a mistake or an attack
CODE_NAMES = {code: name for name, code in reversed(list(LANGUAGE_NAMES.items()))}  # "en" -> "english"


@dataclass(frozen=True)
class RequestId:
    """A request's id: the one Serve's proxy put in its x-request-id header (or the client's own, which the
    proxy keeps), else a new one. The proxy echoes its id on every response; we add the header only where
    no proxy did, so a response carries exactly one."""

    value: str
    echo: bool

    @classmethod
    def of(cls, request: Request) -> "RequestId":
        given = request.headers.get("x-request-id")
        return cls(given, False) if given else cls(f"req_{uuid.uuid4().hex[:20]}", True)

    def headers(self, **more: str) -> dict[str, str]:
        return {"x-request-id": self.value, **more} if self.echo else dict(more)


class ApiError(RayWhisperError):
    """An error answered as OpenAI's API answers one: {"error": {"message", "type", "param", ...}}.
    `api_type` is OpenAI's error type ("invalid_request_error", "server_error"), not a row kind;
    `retry_after_s` is sent as Retry-After (refusals under load or while draining)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 api_type: str = "invalid_request_error", retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.api_type = status, message, param, api_type
        self.retry_after_s = retry_after_s

    def response(self, rid: RequestId) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.api_type, "param": self.param, "code": None,
                          "request_id": rid.value}}
        more = {} if self.retry_after_s is None else {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}
        return JSONResponse(body, status_code=self.status, headers=rid.headers(**more))


@dataclass(frozen=True)
class Fields:
    """A request's form, checked."""

    audio: bytes
    response_format: str
    language: str | None
    prompt: str | None
    temperature: float
    words: bool


async def read_fields(request: Request, options: ServeOptions, tokens: SpecialTokens) -> Fields:
    """The multipart form of a transcription request, checked; ApiError names the field at fault."""
    limit = int(options.max_upload_mb * 1e6)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise ApiError(413, f"the upload is {int(declared) / 1e6:.1f} MB; this endpoint takes files up to "
                       f"{options.max_upload_mb:g} MB (--max-upload-mb)", "file")
    form = await _form(request)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "the 'file' field is required: the audio to transcribe, sent as multipart/form-data",
                       "file")
    data = await upload.read()
    if len(data) > limit:
        raise ApiError(413, f"the file is {len(data) / 1e6:.1f} MB; this endpoint takes files up to "
                       f"{options.max_upload_mb:g} MB (--max-upload-mb)", "file")
    fmt = str(form.get("response_format") or "json")
    if fmt not in FORMATS:
        raise ApiError(400, f"response_format {fmt!r} is not one of {', '.join(FORMATS)}", "response_format")
    granularities = set(form.getlist("timestamp_granularities[]") or form.getlist("timestamp_granularities"))
    if granularities - {"word", "segment"}:
        raise ApiError(400, "timestamp_granularities[] takes 'word' and 'segment'", "timestamp_granularities[]")
    if granularities and fmt != "verbose_json":
        raise ApiError(400, "timestamp_granularities[] needs response_format=verbose_json", "timestamp_granularities[]")
    return Fields(data, fmt, _language(form.get("language"), tokens), str(form.get("prompt") or "") or None,
                  _temperature(form.get("temperature")), "word" in granularities)


async def _form(request: Request) -> Any:
    """The multipart form; a body that is not one (no boundary, two files, too many fields) is a 400 naming
    the part at fault, never a server error."""
    try:
        return await request.form(max_files=1, max_fields=MAX_FIELDS)
    except (HTTPException, MultiPartException, ValueError) as e:  # ValueError: python-multipart on a broken body
        message = str(getattr(e, "detail", None) or e)
        if "files" in message:
            raise ApiError(400, "send one 'file' field: this request has more than one", "file") from e
        if "fields" in message:
            raise ApiError(400, f"the form has more than {MAX_FIELDS} fields; a transcription takes file, model, "
                           "language, prompt, response_format, temperature and timestamp_granularities[]",
                           "form") from e
        raise ApiError(400, f"the body is not a readable multipart/form-data form ({message}); send the audio "
                       "as multipart/form-data with a boundary, as OpenAI's clients do", "content-type") from e


def _language(value: Any, tokens: SpecialTokens) -> str | None:
    if not value:
        return None
    try:
        return language_code(str(value), tokens)
    except ValueError as e:
        raise ApiError(400, str(e), "language") from e


def _temperature(value: Any) -> float:
    try:
        t = float(value) if value not in (None, "") else 0.0
    except ValueError:
        t = -1.0
    if not 0 <= t <= 1:
        raise ApiError(400, f"temperature must be a number between 0 and 1; got {value!r}", "temperature")
    return t


def schedule(temperature: float, decoding: DecodingOptions) -> str:
    """The temperatures a request decodes at, in OpenAI's meaning: 0 falls back through the usual
    temperatures; above 0 starts there."""
    if temperature == 0:
        return decoding.temperatures
    return ",".join(str(t) for t in [temperature] + [s for s in decoding.temperature_steps if s > temperature])


def respond(transcript: FileTranscript, decoded: list[tuple[Chunk, ChunkTranscript | None]], fields: Fields,
            task: str, words: bool, text_of: Any, headers: dict[str, str]) -> Response:
    """The transcript in the response format asked for; `decoded` is each chunk with what it decoded to."""
    row = transcript.columns(words)
    fmt = fields.response_format
    if fmt == "json":
        return JSONResponse({"text": transcript.text}, headers=headers)
    if fmt == "text":
        return PlainTextResponse(transcript.text + "\n", headers=headers)
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(render(row, fmt), headers=headers)
    language = transcript.language or ""
    body = {"task": "translate" if task == "translate" else "transcribe", "language": CODE_NAMES.get(language, language),
            "duration": transcript.duration_s, "text": transcript.text, "segments": _segments(transcript, decoded, text_of)}
    if fields.words:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end}
                         for s in transcript.segments for w in s.words]
    return JSONResponse(body, headers=headers)


def _segments(transcript: FileTranscript, decoded: list[tuple[Chunk, ChunkTranscript | None]],
              text_of: Any) -> list[dict[str, Any]]:
    """verbose_json's segments: the transcript's, with the decoding figures of the chunk each one came from."""
    out = []
    for i, seg in enumerate(transcript.segments):
        chunk, result = next(((c, r) for c, r in decoded if r is not None and c.start / SAMPLE_RATE <= seg.start
                              < c.end / SAMPLE_RATE), (decoded[0][0], None))
        text = "".join(text_of(t) for _, _, t in result.segments) if result else ""
        out.append({"id": i, "seek": int(chunk.start / SAMPLE_RATE * 100), "start": seg.start, "end": seg.end,
                    "text": seg.text, "tokens": [], "temperature": result.temperature if result else 0.0,
                    "avg_logprob": result.avg_logprob if result else 0.0, "compression_ratio": compression_ratio(text),
                    "no_speech_prob": result.no_speech_prob if result else 0.0})
    return out
