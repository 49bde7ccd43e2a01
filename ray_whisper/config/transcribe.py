"""TranscribeOptions: one object of each batch group, built from groups, flat options or both."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .base import _check, int8_on_gpu
from .groups import ChunkOptions, DecodingOptions, ResourceOptions, RunOptions, StorageOptions

GROUPS: dict[str, type] = {
    "decoding": DecodingOptions, "chunks": ChunkOptions, "resources": ResourceOptions, "run": RunOptions,
    "storage": StorageOptions,
}
OWNER = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}  # option -> its group
# Shaping options added after outputs existed: hashed only when set, so that rows written before them keep
# their fingerprint (a rerun would otherwise warn that every old row was made with other options)
HASHED_WHEN_SET = ("audio_track",)


@dataclass(frozen=True, init=False)
class TranscribeOptions:
    """Every option of a run: one object per group. Built from groups, from flat options, or both
    (`TranscribeOptions(resources=ResourceOptions(batch_size=8), beam_size=5)`); unknown names are an error."""

    decoding: DecodingOptions
    chunks: ChunkOptions
    resources: ResourceOptions
    run: RunOptions
    storage: StorageOptions

    def __init__(self, decoding: DecodingOptions | None = None, chunks: ChunkOptions | None = None,
                 resources: ResourceOptions | None = None, run: RunOptions | None = None,
                 storage: StorageOptions | None = None, **options: Any):
        given = {"decoding": decoding, "chunks": chunks, "resources": resources, "run": run, "storage": storage}
        unknown = sorted(set(options) - set(OWNER))
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(unknown)}; see `ray-whisper transcribe --help`")
        for group, cls in GROUPS.items():
            mine = {k: v for k, v in options.items() if OWNER[k] == group}
            base = given[group] or cls()
            object.__setattr__(self, group, dataclasses.replace(base, **mine) if mine else base)
        refused = int8_on_gpu(self.decoding.dtype, self.resources.gpus_per_actor, "--gpus-per-actor")
        _check(refused is None, refused or "")

    def __getattr__(self, name: str) -> Any:
        """Options read flat as well (`options.batch_size`); only called for names that are not attributes."""
        group = OWNER.get(name)
        if group is None:
            raise AttributeError(f"TranscribeOptions has no option {name!r}")
        return getattr(getattr(self, group), name)

    def replace(self, **options: Any) -> TranscribeOptions:
        """A copy with these flat options changed (checked again)."""
        return TranscribeOptions(**{g: getattr(self, g) for g in GROUPS}, **options)

    def flat(self) -> dict[str, Any]:
        """Every option by name."""
        return {name: getattr(getattr(self, group), name) for name, group in OWNER.items()}

    def fingerprint(self) -> str:
        """12 hex digits naming the options that shape a transcript (decoding and chunks): written into every
        output row, so that a rerun with other options can tell the rows made with the old ones."""
        shaping = dataclasses.asdict(self.decoding) | dataclasses.asdict(self.chunks)
        shaping = {k: v for k, v in shaping.items() if not (k in HASHED_WHEN_SET and v is None)}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def option_fields() -> list[dataclasses.Field]:
    """Every option's field, group by group, in the order --help lists them."""
    return [f for cls in GROUPS.values() for f in dataclasses.fields(cls)]
