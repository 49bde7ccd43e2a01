"""ray_whisper: transcribe a manifest of audio files with Whisper on a Ray cluster.

    import ray_whisper
    summary = ray_whisper.transcribe("manifest.csv", "out/", batch_size=16)
    ds = ray_whisper.build_dataset("manifest.csv")   # lazy Ray Dataset of output rows
    out = ray_whisper.transcribe_dataset(ray.data.read_parquet("calls/"), audio_column="uri")  # Dataset in, out

Heavy libraries (ray, torch) load on first use, not at import.
"""

from __future__ import annotations

from typing import Any

from .config import ChunkOptions, DecodingOptions, ResourceOptions, RunOptions, StorageOptions, TranscribeOptions
from .errors import ConfigError, RayWhisperError

__all__ = [
    "ChunkOptions", "ConfigError", "DecodingOptions", "RayWhisperError", "ResourceOptions", "RunOptions",
    "StorageOptions", "Summary", "TranscribeOptions", "build_dataset", "read_results", "transcribe",
    "transcribe_dataset",
]
__version__ = "0.1.0"


def transcribe(manifest: str, output: str, options: TranscribeOptions | None = None, **overrides: Any):
    """Transcribe every row of `manifest` into Parquet under `output`; returns a Summary."""
    from .batch.pipeline import transcribe as _transcribe

    return _transcribe(manifest, output, options, **overrides)


def build_dataset(manifest: str, options: TranscribeOptions | None = None, **overrides: Any):
    """The lazy Ray Dataset of output rows, one per manifest row."""
    from .batch.pipeline import build_dataset as _build

    return _build(manifest, options, **overrides)


def transcribe_dataset(ds: Any, audio_column: str = "audio", id_column: str | None = None, **options: Any):
    """The lazy Ray Dataset of output rows for a Ray Dataset whose `audio_column` holds URIs, bytes or decoded
    audio, its other columns carried through (batch.dataset.transcribe_dataset has every argument)."""
    from .batch.dataset import transcribe_dataset as _transcribe_dataset

    return _transcribe_dataset(ds, audio_column, id_column, **options)


def read_results(output: str, storage_options: StorageOptions | None = None):
    """The output table of a finished run (one row per manifest row); raises if the run did not finish."""
    from .io.output import read_results as _read

    return _read(output, storage_options)


def __getattr__(name: str) -> Any:
    if name == "Summary":
        from .batch.report import Summary

        return Summary
    raise AttributeError(name)
