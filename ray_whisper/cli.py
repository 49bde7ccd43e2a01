"""`ray-whisper transcribe MANIFEST OUTPUT_DIR`: the argparse front end, built from config.py."""

from __future__ import annotations

import argparse
import logging
import sys

from . import config

DESCRIPTION = """\
Transcribe every audio file listed in MANIFEST with Whisper on a Ray cluster (the one in RAY_ADDRESS,
else a local one) and write one Parquet row per manifest row under OUTPUT_DIR.

MANIFEST is a .csv, .jsonl or .parquet file with an 'audio' column (path or URI; relative paths are
relative to the manifest) and optional 'id' and 'language' columns.
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
    t.add_argument("manifest", metavar="MANIFEST", help="manifest file (.csv / .jsonl / .parquet)")
    t.add_argument("output", metavar="OUTPUT_DIR", help="directory that receives the Parquet files")
    config.add_arguments(t)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = config.from_namespace(args)
        from .pipeline import transcribe

        summary = transcribe(args.manifest, args.output, options)
    except (config.ConfigError, ValueError) as e:
        print(f"ray-whisper: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
