"""`ray-whisper transcribe MANIFEST OUTPUT_DIR`: the argparse front end, built from config.py."""

from __future__ import annotations

import argparse
import logging
import sys

from . import config
from .errors import Interrupted, RayWhisperError, redact

DESCRIPTION = """\
Transcribe every audio file listed in MANIFEST with Whisper on a Ray cluster (the one in RAY_ADDRESS,
else a local one) and write one Parquet row per manifest row under OUTPUT_DIR.

MANIFEST is a .csv, .jsonl or .parquet file with an 'audio' column (path or URI; relative paths are
relative to the manifest) and optional 'id' and 'language' columns; or a folder/prefix ending in '/',
or a quoted glob ('s3://bucket/calls/**/*.mp3'), whose audio files become the rows (id = the path below
the folder). MANIFEST, the audio and OUTPUT_DIR may be local paths or URLs (s3://, gs://, ...).
S3 credentials come from the usual AWS environment variables or profiles, never from flags.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-whisper", description="Batch Whisper transcription on Ray Data.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "transcribe",
        help="transcribe a manifest of audio files into Parquet",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("manifest", metavar="MANIFEST", help="manifest file (.csv / .jsonl / .parquet), folder/prefix ending in /, or quoted glob")
    t.add_argument("output", metavar="OUTPUT_DIR", help="directory or URL prefix (s3://bucket/out/) that receives the Parquet files")
    config.add_arguments(t)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when every row is ok (or --allow-partial), 1 when some rows are errors, 2 when the run
    could not start or could not write its output (bad option, manifest, model or output), 130 when it was
    interrupted (what finished is kept; a rerun resumes)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
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


def _quiet_ray_logging() -> None:
    """What a run prints: ray_whisper's own lines (progress, resume, errors) and Ray's warnings and errors.
    Ray Data's INFO lines (execution plans, log paths) are left out; its full logs stay in the Ray session's
    log folder."""
    import ray.data  # noqa: F401  (~2 s, only once the options are known to be good) sets up Ray Data's loggers

    logging.getLogger("ray.data").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())

