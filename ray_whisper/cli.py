"""`ray-whisper transcribe | export`: the argparse front end, its flags generated from config.py."""

from __future__ import annotations

import argparse
import logging
import sys

from . import config
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
or write its output, 130 interrupted (what finished is kept: the same command resumes).
"""

EXPORT = """\
Write one file per ok row of the run in OUTPUT_DIR and per format: DEST/<id>.srt, DEST/<id>.vtt, ...
(an id with '/' in it becomes sub-folders). OUTPUT_DIR and DEST may be local paths or URLs. Subtitle cues
have at most 2 lines of at most 42 characters, cut at word boundaries.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-whisper", description="Batch Whisper transcription on Ray Data.")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    t = sub.add_parser("transcribe", help="transcribe a manifest of audio files into Parquet", description=TRANSCRIBE,
                       formatter_class=raw)
    t.add_argument("manifest", metavar="MANIFEST", help="manifest file (.csv / .tsv / .jsonl / .parquet), folder/prefix ending in /, or quoted glob")
    t.add_argument("output", metavar="OUTPUT_DIR", help="directory or URL prefix (s3://bucket/out/) that receives the Parquet files")
    config.add_arguments(t)
    e = sub.add_parser("export", help="write subtitle and text files (srt, vtt, txt, json) from a run's table",
                       description=EXPORT, formatter_class=raw)
    e.add_argument("output", metavar="OUTPUT_DIR", help="the OUTPUT_DIR of a transcribe run")
    e.add_argument("dest", metavar="DEST", help="directory or URL prefix that receives the files")
    config.add_arguments(e, (config.ExportOptions, config.StorageOptions))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when every row is ok (or --allow-partial), 1 when some rows are errors, 2 when the run
    could not start or could not write its output (bad option, manifest, model or output), 130 when it was
    interrupted (what finished is kept; a rerun resumes)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "export":
            return _export(args)
        options = config.from_namespace(args)
        _quiet_ray_logging()
        from .pipeline import transcribe  # pyarrow, tokenizers, the model resolver: not for --help

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
    print(summary)
    if summary.files_failed and not options.run.allow_partial:
        print(f"ray-whisper: {summary.files_failed} file(s) failed; see the 'error' column "
              "(--allow-partial to exit 0 anyway, --retry-errors to rerun them)", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export

    picked = vars(args)
    options = config.ExportOptions(**{k: v for k, v in picked.items() if k in config.field_names(config.ExportOptions)})
    storage = config.StorageOptions(**{k: v for k, v in picked.items() if k in config.field_names(config.StorageOptions)})
    print(export(args.output, args.dest, options, storage))
    return 0


def _quiet_ray_logging() -> None:
    """What a run prints: ray_whisper's own lines (progress, resume, errors) and Ray's warnings and errors.
    Ray Data's INFO lines (execution plans, log paths) are left out; its full logs stay in the Ray session's
    log folder."""
    import ray.data  # noqa: F401  (~2 s, only once the options are known to be good) sets up Ray Data's loggers

    logging.getLogger("ray.data").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
