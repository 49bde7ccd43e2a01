"""The OpenAI-compatible endpoint on Ray Serve: `serve run ray_whisper.serve:app`.

Serve's proxy imports serve.proxy and serve.health on every node, some with Ray Serve only (no torch, no
model code): there the app is not imported, and asking for it says what is missing."""

from __future__ import annotations

from typing import Any

try:
    from .app import app, build
except ImportError as missing:  # a node with Ray Serve only: the proxy's modules need nothing more
    _missing = missing

    def __getattr__(name: str) -> Any:
        if name in ("app", "build"):
            raise ImportError(f"ray_whisper.serve.{name} needs the model's dependencies (pip install ray-whisper "
                              f"with its dependencies): {_missing}") from _missing
        raise AttributeError(name)

__all__ = ["app", "build"]
