"""The OpenAI-compatible endpoint on Ray Serve: `serve run ray_whisper.serve:app`.

The app (and with it torch and the model code) loads on first use: Serve's proxy imports serve.proxy and
serve.health alone, on nodes that may not have the model's dependencies."""

from __future__ import annotations

from typing import Any

__all__ = ["app", "build"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        module = importlib.import_module(".app", __name__)  # which binds the name `app` here to the module:
        globals().update(app=module.app, build=module.build)  # the function, as `from .app import app` did
        return globals()[name]
    raise AttributeError(name)
