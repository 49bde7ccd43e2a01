"""Entrypoint for `ray job submit`: the same flags as `ray-whisper transcribe`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/transcribe.py transcribe s3://bucket/manifest.csv s3://bucket/out/

Inside a job, RAY_ADDRESS points at the cluster, so the run joins it instead of starting a local Ray.
"""

import sys
from pathlib import Path

# With --working-dir the package travels as source: make it importable even where it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_whisper.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] != "transcribe":
        argv = ["transcribe", *argv]  # the subcommand is optional here: this entrypoint only transcribes
    sys.exit(main(argv))
