"""Every error the package raises on purpose, every kind that reaches an output row, and the two helpers that
make a message fit a row or a log line (`one_line`, `redact`).

A leaf: imports nothing of the package. An error row's `error` column reads "<kind>: <reason>"; the kinds
below are the only ones, and the summary counts rows by them.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

# Kinds of error rows (per file): the text before the colon in the `error` column
FETCH_ERROR = "fetch_error"  # missing object, denied, unreachable, timed out
DECODE_ERROR = "decode_error"  # not audio, corrupt
NO_AUDIO = "no_audio"  # empty file, no audio stream, zero samples
MODEL_ERROR = "model_error"  # the model failed on the file's chunks
INTERNAL_ERROR = "internal_error"  # a bug: anything unexpected while handling one file
LOST = "lost"  # no result came back from the cluster (worker or node lost); a rerun redoes it
ROW_KINDS = (FETCH_ERROR, DECODE_ERROR, NO_AUDIO, MODEL_ERROR, INTERNAL_ERROR, LOST)
TRUNCATED = "truncated"  # a warning on an ok row: the file broke off; what decoded was transcribed


class RayWhisperError(Exception):
    """Base of every error the package raises on purpose. `kind` names it in rows and summaries."""

    kind = INTERNAL_ERROR


# The run cannot start (exit status 2); raised on the driver, the message says what to change.
class ConfigError(RayWhisperError, ValueError):
    """A bad option, found before any Ray work starts."""


class ManifestError(RayWhisperError, ValueError):
    """The manifest cannot be used as given."""


class ModelError(RayWhisperError):
    """A model could not be resolved, converted or loaded."""


class OutputError(RayWhisperError):
    """The output location cannot be used, or writing to it failed."""


class OutputBusyError(OutputError):
    """Another live run holds the output directory's lease (io/lease.py); the message names it."""


class IncompleteOutputError(OutputError):
    """The output has no _SUCCESS marker: its run did not finish, rows may be missing."""


class ClusterError(RayWhisperError):
    """Ray could not be started or reached, or went away under the run (exit 2; what finished is kept and the
    same command resumes)."""


class Interrupted(RayWhisperError):
    """The run was stopped (Ctrl-C, SIGTERM); the message says what was kept and how to resume (exit 130)."""


class ContractError(RayWhisperError):
    """A stage got a batch without the columns it needs: a wiring bug, never the user's input."""


# One file cannot be used: becomes that file's error row, and the run goes on.
class FileError(RayWhisperError):
    """A per-file failure; its `kind` is one of ROW_KINDS."""


class FetchError(FileError):
    """The bytes could not be read: missing object, denied access, unreachable or silent store."""

    kind = FETCH_ERROR
    transient = False  # a timeout or a failed connection: worth another try


class DecodeError(FileError):
    """The bytes are not decodable audio (corrupt, truncated header, not a media file)."""

    kind = DECODE_ERROR


class TruncatedError(DecodeError):
    """The stream ended short of the length its container declares; everything before the cut decoded (a
    warning on an ok row when there was audio)."""


class NoAudioError(FileError):
    """The container decodes but holds no audio stream or no samples."""

    kind = NO_AUDIO


def one_line(e: BaseException | str, limit: int = 300) -> str:
    """A message (or an exception's) on one line, at most `limit` characters; the type name when empty."""
    text = " ".join(str(e).split())
    if not text and isinstance(e, BaseException):
        text = type(e).__name__
    return text[:limit]


SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")
_SECRET_VALUE = re.compile(
    r"(?i)(secret[_-]?(access[_-]?)?key|secret|password|token|signature|x-amz-signature|x-amz-credential|"
    r"x-amz-security-token)(['\"]?\s*[=:]\s*['\"]?)([^&\s'\",}]+)"
)


# Query parameters whose values are shown and stored as given: they choose a format or a version of an object,
# never who may read it. Every other parameter's value becomes *** (access_token, api_key, sig, code, X-Amz-*,
# ...: secrets come under too many names to list), and so does a parameter without a value (?<token>).
HARMLESS_QUERY_PARAMS = frozenset({
    "format", "version", "versionid", "generation", "alt", "x-id", "partnumber", "dl", "download", "raw",
    "response-content-type", "response-content-language", "response-content-encoding", "response-cache-control",
})
_URL_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"<>]*\?)([^\s#'\"<>)]*)")


def redact_query(query: str) -> str:
    """A URL's query string with the value of every parameter not in HARMLESS_QUERY_PARAMS replaced by ***."""
    def one(pair: str) -> str:
        key, eq, _ = pair.partition("=")
        if unquote(key).lower() in HARMLESS_QUERY_PARAMS:
            return pair
        return f"{key}=***" if eq else "***"

    return "&".join(one(pair) for pair in query.split("&") if pair)


def redact(text: str) -> str:
    """Remove secrets from a message: the values of this process's AWS secret variables, the credentials of
    a URL (scheme://user:password@host keeps the user), the values of a URL's query parameters (all but
    HARMLESS_QUERY_PARAMS), and the values of secret=..., Signature=..., X-Amz-Credential=... elsewhere."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    text = _URL_PASSWORD.sub(r"\1***@", text)
    text = _URL_QUERY.sub(lambda m: m.group(1) + redact_query(m.group(2)), text)
    return _SECRET_VALUE.sub(r"\1\3***", text)


def row_error(kind: str, reason: BaseException | str) -> str:
    """The `error` column of an error row: "<kind>: <one secret-free line>"."""
    text = redact(str(reason)) or (type(reason).__name__ if isinstance(reason, BaseException) else "")
    return f"{kind}: {one_line(text, 500)}"


def kind_of(error: str | None) -> str:
    """The kind of an `error` column value ("fetch_error: not found: ..." -> "fetch_error")."""
    return (error or "unknown").split(":", 1)[0]
