"""The OpenAI-compatible endpoint on Ray Serve: `serve run ray_whisper.serve:app`."""

from .app import app, build

__all__ = ["app", "build"]
