"""Every option, defined once, in groups: frozen dataclasses checked on construction, on the driver.

Each stage receives only its group (the model actors get DecodingOptions, the CPU stage the chunk geometry and
StorageOptions, the resource planner ResourceOptions). `TranscribeOptions` holds one of each and takes the
options flat as well (`TranscribeOptions(batch_size=8, beam_size=5)`). The CLI's flags and their `--help` are
generated from the fields (cli.add_arguments), so help lives next to the field it describes.

base: how an option is declared and read from text; groups: the batch job's groups; commands: `export` and
`serve`'s; transcribe: TranscribeOptions, one of each batch group.
"""

from ..errors import ConfigError
from .base import BUNDLED_MODEL, EXPORT_FORMATS, flag, int8_on_gpu, option_type, parse_text
from .commands import ExportOptions, ServeOptions
from .groups import ChunkOptions, DecodingOptions, ResourceOptions, RunOptions, StorageOptions
from .transcribe import GROUPS, OWNER, TranscribeOptions, field_names, option_fields

__all__ = [
    "BUNDLED_MODEL", "EXPORT_FORMATS", "GROUPS", "OWNER", "ChunkOptions", "ConfigError", "DecodingOptions",
    "ExportOptions", "ResourceOptions", "RunOptions", "ServeOptions", "StorageOptions", "TranscribeOptions",
    "field_names", "flag", "int8_on_gpu", "option_fields", "option_type", "parse_text",
]
