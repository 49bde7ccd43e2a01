"""`ray-whisper transcribe | export | serve`: the argparse front end, its flags generated from the config package."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, Literal, get_args, get_origin, get_type_hints

from . import config
from .batch.cluster import connect
from .errors import Interrupted, RayWhisperError, redact

TRANSCRIBE = """\
Transcribe every audio file listed in MANIFEST with Whisper on a Ray cluster (the one in RAY_ADDRESS,
else a local one) and write one Parquet row per manifest row under OUTPUT_DIR.

MANIFEST is a .csv, .tsv, .jsonl or .parquet file with an 'audio' column (path or URI; relative paths are
relative to the manifest) and optional 'id' and 'language' columns; or a folder/prefix ending in '/',
or a quoted glob ('s3://bucket/calls/**/*.mp3'), whose audio files become the rows (id = the path below
the folder). MANIFEST, the audio and OUTPUT_DIR may be local paths or URLs (s3://, gs://, ...).
S3 credentials come from the usual AWS environment variables or profiles, never from flags.

Exit status: 0 every row ok, 1 some rows are errors (see their 'error' column), 2 the run could not start
or write its output, or Ray could not be reached or went away (the same command resumes), 130 interrupted
by Ctrl-C or SIGTERM (what finished is kept: the same command resumes).
"""

SERVE = """\
Serve the model online on Ray Serve (the cluster in RAY_ADDRESS, else a local Ray), compatible with OpenAI's
audio API: POST /v1/audio/transcriptions and /v1/audio/translations (multipart: file, model, language,
prompt, response_format json|text|srt|vtt|verbose_json, temperature, timestamp_granularities[]); GET /health
and /ready (503 with the reason while no replica takes work). Chunks of concurrent requests share the model's
batches.

Exit status: 0 stopped by SIGTERM or Ctrl-C (new requests refused, those in flight given --drain-timeout-s; during
start-up: what was started stopped), 2 the endpoint could not start (bad option or model, Ray unreachable).
"""

EXPORT = """\
Write one file per ok row of the run in OUTPUT_DIR and per format: DEST/<id>.srt, DEST/<id>.vtt, ...
(an id with '/' in it becomes sub-folders). OUTPUT_DIR and DEST may be local paths or URLs. Subtitle cues
have at most 2 lines of at most 42 characters, cut at word boundaries.
"""


def add_arguments(parser: argparse.ArgumentParser, groups: tuple[type, ...] = tuple(config.GROUPS.values())) -> None:
    """One flag per option of these option classes, in argparse groups, with the field's help text."""
    for cls in groups:
        section = parser.add_argument_group(cls.title)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            names = [config.flag(f.name)] + ([config.flag(f.metadata["alias"])] if f.metadata.get("alias") else [])
            section.add_argument(*names, **_argument(f, hints[f.name]))


def _argument(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    kind = config.option_type(hint)
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(hint) is Literal:
        kwargs["choices"] = get_args(hint)
    else:
        kwargs["type"] = kind
    if f.metadata.get("metavar"):
        kwargs["metavar"] = f.metadata["metavar"]
    help_text = f.metadata.get("help", "")
    kwargs["help"] = f"{help_text} (default: {f.default})" if f.default is not None else help_text
    return kwargs


def from_namespace(ns: argparse.Namespace) -> config.TranscribeOptions:
    """TranscribeOptions from the flags that `add_arguments` defined (unset flags keep the defaults)."""
    return config.TranscribeOptions(**{k: v for k, v in vars(ns).items() if k in config.OWNER})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-whisper", description="Batch Whisper transcription on Ray Data.")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    t = sub.add_parser("transcribe", help="transcribe a manifest of audio files into Parquet", description=TRANSCRIBE,
                       formatter_class=raw)
    t.add_argument("manifest", metavar="MANIFEST", help="manifest file (.csv / .tsv / .jsonl / .parquet), folder/prefix ending in /, or quoted glob")
    t.add_argument("output", metavar="OUTPUT_DIR", help="directory or URL prefix (s3://bucket/out/) that receives the Parquet files")
    add_arguments(t)
    e = sub.add_parser("export", help="write subtitle and text files (srt, vtt, txt, json) from a run's table",
                       description=EXPORT, formatter_class=raw)
    e.add_argument("output", metavar="OUTPUT_DIR", help="the OUTPUT_DIR of a transcribe run")
    e.add_argument("dest", metavar="DEST", help="directory or URL prefix that receives the files")
    add_arguments(e, (config.ExportOptions, config.StorageOptions))
    v = sub.add_parser("serve", help="serve the model online: an OpenAI-compatible endpoint on Ray Serve",
                       description=SERVE, formatter_class=raw)
    add_arguments(v, (config.ServeOptions, config.DecodingOptions, config.ChunkOptions))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when every row is ok (or --allow-partial), 1 when some rows are errors, 2 when the run
    could not start or could not write its output (bad option, manifest, model or output; Ray unreachable, or
    gone under the run), 130 when it was interrupted by Ctrl-C or SIGTERM (what finished is kept; a rerun
    resumes)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "export":
            return _export(args)
        if args.command == "serve":
            return _serve(args)
        options = from_namespace(args)
        _quiet_ray_logging()
        from .batch.pipeline import transcribe  # pyarrow, tokenizers, the model resolver: not for --help

        import ray

        ours = not ray.is_initialized()  # a Ray this run starts (or joins) is left when it ends; a caller's stays
        # SIGTERM (Kubernetes stopping a pod, `ray job stop`, systemd) takes Ctrl-C's path: parts kept, exit 130
        with _sigterm_as_ctrl_c():
            summary = transcribe(args.manifest, args.output, options)
    except Interrupted as e:
        print(f"ray-whisper: {redact(str(e))}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("ray-whisper: interrupted before any file was transcribed; nothing to resume", file=sys.stderr)
        return 130
    except RayWhisperError as e:
        print(f"ray-whisper: error: {redact(str(e))}", file=sys.stderr)
        return 2
    print(summary, flush=True)
    if ours:  # the run is saved and said: its local Ray stops now, not in Ray's exit handler (~1.5 s of waits)
        from .batch.cluster import stop

        stop()
    if summary.files_failed and not options.run.allow_partial:
        print(f"ray-whisper: {summary.files_failed} file(s) failed; see the 'error' column "
              "(--allow-partial to exit 0 anyway, --retry-errors to rerun them)", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    from .io.export import export

    print(export(args.output, args.dest, _options(args, config.ExportOptions), _options(args, config.StorageOptions)))
    return 0


def _options(args: argparse.Namespace, cls: type) -> Any:
    return cls(**{k: v for k, v in vars(args).items() if k in config.field_names(cls)})


def _serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C, then drain; either signal during start-up stops what was started.
    Exit 0 either way (a stop that was asked for)."""
    import os

    from ray import serve

    from .serve.app import build, clear_drain, openai_errors_in_the_proxy

    decoding, chunks = _options(args, config.DecodingOptions), _options(args, config.ChunkOptions)
    options = _options(args, config.ServeOptions)
    _quiet_ray_logging()
    openai_errors_in_the_proxy()
    local = not os.environ.get("RAY_ADDRESS")  # connect() starts a local Ray exactly then
    # a process manager's stop (systemd, Kubernetes) as Ctrl-C, from here on: connect() keeps this handler
    # across ray.init, which would otherwise install Ray's own (the process dies with what it started)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        local = connect()
        serve.start(http_options={"host": options.host, "port": options.port})
        clear_drain("ray_whisper")
        serve.run(build(decoding, chunks, options), name="ray_whisper", route_prefix="/")
    except KeyboardInterrupt:
        _stop_serving(local, " during its start-up, before it served (SIGTERM or Ctrl-C)")
        return 0
    host, port = _listening(options)
    print(f"serving {decoding.model} on http://{host}:{port}/v1/audio/transcriptions "
          "(GET /health, /ready; Ctrl-C stops)", flush=True)
    _serve_until_stopped(options, local)
    return 0


def _serve_until_stopped(options: config.ServeOptions, local: bool) -> None:
    import time

    from .serve.app import drain

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"ray-whisper: draining: new requests get 503, those in flight have {options.drain_timeout_s:g} s "
              "(--drain-timeout-s)", file=sys.stderr, flush=True)
        drained = drain("ray_whisper", options.drain_timeout_s)
        _stop_serving(local, "" if drained else " (requests left at the deadline got 503)")


def _stop_serving(local: bool, note: str) -> None:
    """The endpoint gone: with a local Ray, Serve and Ray itself; on a shared cluster, only this app."""
    import ray
    from ray import serve

    from .batch.cluster import stop
    from .serve.app import clear_drain

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up runs to its end: a second Ctrl-C waits
    if ray.is_initialized():
        if local:
            serve.shutdown()
            stop()
        else:  # other Serve apps of the cluster stay
            with contextlib.suppress(Exception):  # not deployed yet: nothing to delete
                serve.delete("ray_whisper")
            with contextlib.suppress(Exception):  # Ray's KV gone with the cluster: nothing to clear
                clear_drain("ray_whisper")
    print(f"ray-whisper: the endpoint stopped{note}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not break the clean-up
    raise KeyboardInterrupt


def _listening(options: config.ServeOptions) -> tuple[str, int]:
    """Where Serve really listens: a cluster whose Serve already runs keeps its own host and port (and
    Ray warns that ours are ignored)."""
    try:
        from ray.serve.context import _get_global_client  # internal; its absence only costs the check

        http = _get_global_client().http_config
        return http.host, int(http.port)
    except (ImportError, AttributeError, RuntimeError):
        return options.host, options.port


def _quiet_ray_logging() -> None:
    """What a run prints: ray_whisper's own lines (progress, resume, errors) and Ray's warnings and errors.
    Ray Data's INFO lines (execution plans, log paths) are left out; its full logs stay in the Ray session's
    log folder."""
    import ray.data  # noqa: F401  (~2 s, only once the options are known to be good) sets up Ray Data's loggers

    logging.getLogger("ray.data").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
