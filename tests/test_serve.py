"""The endpoint on the session's local Ray with the real model, driven by the real `openai` client: every
response format, a long file, concurrent requests sharing batches, and bad input that gets an error, never a
dead replica. Then `ray-whisper serve` itself, in a process of its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pysubs2
import pytest
import requests

from ray_whisper.asr import evaluation as ev
from ray_whisper.config import ChunkOptions, DecodingOptions, ServeOptions

from conftest import DATA, REFS, starlette_request, write_wav

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
JFK = DATA / "jfk.flac"
LIMIT_MB = 4.0  # a 70 s WAV is 2.2 MB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(ray_session, bundled_model):
    """The app as `serve run ray_whisper.serve.app:app max_upload_mb=4 ...` builds it: the import path and text
    arguments through Serve's own builder call."""
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"max_upload_mb": str(LIMIT_MB), "max-batch-size": "8", "batch_wait_timeout_s": "0.2"}
    serve.run(call_user_app_builder_with_args_if_necessary(import_attr("ray_whisper.serve.app:app"), args),
              name="rw-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_openai_client_transcribes_and_gets_one_request_id(client):
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=JFK.open("rb"))
    assert len(raw.headers.get_list("x-request-id")) == 1  # Serve's proxy's id, not a second one of ours
    assert ev.wer([REFS["jfk.flac"]["text"]], [raw.parse().text]) <= 0.05


def test_every_response_format(client):
    text = client.audio.transcriptions.create(model="whisper-1", file=JFK.open("rb"), response_format="text")
    assert ev.wer([REFS["jfk.flac"]["text"]], [text]) <= 0.05
    for fmt in ("srt", "vtt"):
        body = client.audio.transcriptions.create(model="whisper-1", file=JFK.open("rb"), response_format=fmt)
        events = pysubs2.SSAFile.from_string(body, format_=fmt).events
        assert events and all(len(line) <= 42 for e in events for line in e.plaintext.split("\n"))
        assert ev.normalize(" ".join(e.plaintext.replace("\n", " ") for e in events)) == ev.normalize(text)
    verbose = client.audio.transcriptions.create(model="whisper-1", file=JFK.open("rb"), response_format="verbose_json",
                                                 timestamp_granularities=["word", "segment"])
    assert verbose.language == "english" and abs(verbose.duration - 11.0) < 0.1
    assert verbose.segments and verbose.segments[0].start < 1.0 and verbose.segments[-1].end <= 11.0
    words = verbose.words
    assert len(words) == len(verbose.text.split()) and all(a.start <= b.start for a, b in zip(words, words[1:]))
    assert next(w for w in words if w.word.startswith("Americans")).start < 2.5
    plain = client.audio.transcriptions.create(model="whisper-1", file=JFK.open("rb"), response_format="verbose_json")
    assert plain.words is None  # words only when asked for


def test_a_prompt_reaches_the_decoder(client):
    hot = DATA / "hotwords.mp3"
    plain = client.audio.transcriptions.create(model="whisper-1", file=hot.open("rb")).text
    prompted = client.audio.transcriptions.create(model="whisper-1", file=hot.open("rb"), prompt="ComfyUI").text
    assert "ComfyUI" not in plain and "ComfyUI" in prompted


def test_a_long_file_is_transcribed_across_its_chunks(client, speech_clips, tmp_path):
    audio, reference = ev.build_long_speech(speech_clips, 70, seed=4)
    path = write_wav(tmp_path / "long.wav", audio)
    verbose = client.audio.transcriptions.create(model="whisper-1", file=path.open("rb"), response_format="verbose_json")
    assert verbose.segments[-1].end > 60 and ev.wer([reference], [verbose.text]) <= 0.1


def test_concurrent_requests_share_batches(client, server):
    before = health(server)
    texts: list[str] = []

    def one() -> None:
        texts.append(client.audio.transcriptions.create(model="whisper-1", file=JFK.open("rb")).text)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    after = health(server)
    assert len(texts) == 6 and all(ev.wer([REFS["jfk.flac"]["text"]], [t]) <= 0.05 for t in texts)
    chunks, batches = after["chunks"] - before["chunks"], after["batches"] - before["batches"]
    assert chunks == 6 and batches < 6, (chunks, batches)  # chunks of different requests decoded together


@pytest.mark.parametrize("case", ["not audio", "too large", "bad format", "bad language", "bad temperature",
                                  "translate on an English-only model"])
def test_bad_input_gets_a_4xx_with_what_to_fix(client, case):
    import openai

    file, kwargs, status, words = JFK.open("rb"), {}, 400, ""
    if case == "not audio":
        file, status, words = ("notes.wav", b"this is not audio" * 100), 400, "not audio"
    elif case == "too large":
        file, status, words = ("big.wav", os.urandom(int(LIMIT_MB * 1e6) + 200_000)), 413, "up to 4 MB"
    elif case == "bad format":
        kwargs, words = {"response_format": "docx"}, "response_format"
    elif case == "bad language":
        kwargs, words = {"language": "xx"}, "unknown language"
    elif case == "bad temperature":
        kwargs, words = {"temperature": 5}, "between 0 and 1"
    create = client.audio.transcriptions.create
    if case.startswith("translate"):
        create, status, words = client.audio.translations.create, 400, "English-only"
    with pytest.raises(openai.APIStatusError) as ei:
        create(model="whisper-1", file=file, **kwargs)
    assert ei.value.status_code == status
    error = ei.value.body["error"] if isinstance(ei.value.body, dict) and "error" in ei.value.body else ei.value.body
    assert words in error["message"] and error["request_id"] == ei.value.response.headers["x-request-id"]


def test_a_missing_field_is_400_and_health_answers(server):
    reply = requests.post(f"{server}/v1/audio/transcriptions", data={"model": "whisper-1"}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "file"
    assert health(server)["status"] == "ok"


def raw_post(server: str, head: bytes, body: bytes, method: str = "POST", path: str = "/v1/audio/transcriptions"):
    """A request as bytes on a socket (what no client library would send); its status, headers and JSON."""
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n".encode()
                  + head + b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    top, _, payload = data.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
    return int(lines[0].split()[1]), headers, json.loads(payload)


def form(*parts: tuple[str, str, bytes]) -> bytes:
    out = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--b0\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + b"--b0--\r\n"


MULTIPART = b"Content-Type: multipart/form-data; boundary=b0\r\n"


@pytest.mark.parametrize("case", ["two files", "too many fields", "no boundary", "GET", "unknown path"])
def test_every_client_mistake_is_a_4xx_in_openais_shape_with_param_and_one_request_id(server, case):
    audio = JFK.read_bytes()
    head, body, method, path = MULTIPART, b"", "POST", "/v1/audio/transcriptions"
    status, param = 400, "file"
    if case == "two files":
        body = form(("file", "a.flac", audio), ("file", "b.flac", audio))
    elif case == "too many fields":
        body, param = form(("file", "a.flac", audio), *[(f"x{i}", "", b"1") for i in range(40)]), "form"
    elif case == "no boundary":
        head, body, param = b"Content-Type: multipart/form-data\r\n", form(("file", "a.flac", audio)), "content-type"
    elif case == "GET":
        method, status, param = "GET", 405, "method"
    else:
        path, status, param = "/v1/audio/transcription", 404, "path"
    code, headers, reply = raw_post(server, head, body, method, path)
    ids = [v for k, v in headers if k.lower() == "x-request-id"]
    assert code == status and reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"
    assert len(ids) == 1 and reply["error"]["request_id"] == ids[0]


def test_a_prompt_over_the_models_window_is_cut_and_the_response_says_so(client):
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=JFK.open("rb"),
                                                               prompt="word " * 2000)
    assert "cut to its last 223" in raw.headers["x-prompt-truncated"]
    assert ev.wer([REFS["jfk.flac"]["text"]], [raw.parse().text]) <= 0.2


def test_a_client_that_goes_away_mid_upload_costs_nothing(server, client):
    before = health(server)
    boundary = "rwboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.flac\"\r\n"
            "Content-Type: audio/flac\r\n\r\n").encode()
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1500000\r\n"
                   f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode() + head + JFK.read_bytes()[:20_000])
        time.sleep(0.5)
    time.sleep(1.0)
    after = health(server)
    assert after["status"] == "ok" and after["batches"] == before["batches"]  # nothing was decoded for it
    assert ev.wer([REFS["jfk.flac"]["text"]], [client.audio.transcriptions.create(model="whisper-1", file=JFK.open("rb")).text]) <= 0.05


def test_a_model_failure_is_a_500_with_the_request_id_and_the_replica_goes_on(bundled_model):
    """The request handler itself, outside Serve (its queue runs in any event loop): the model raising answers
    500, JSON, with the id; the next request works."""
    from starlette.requests import Request

    from ray_whisper.serve.app import Service

    service = Service(bundled_model, "m", DecodingOptions(), ChunkOptions(), ServeOptions())
    prepared = requests.Request("POST", "http://x/v1/audio/transcriptions", files={"file": ("jfk.flac", JFK.read_bytes())},
                                data={"model": "whisper-1"}).prepare()

    def request() -> Request:
        return starlette_request(prepared)

    def broken(**changes):
        raise RuntimeError("CUDA error: out of memory")

    async def twice():  # one event loop, as in a replica: the batch queue lives in it
        working = service.engine._variant
        service.engine._variant = broken
        failed = await service._answer(request(), "transcribe")
        service.engine._variant = working
        return failed, await service._answer(request(), "transcribe")

    failed, ok = asyncio.run(twice())
    body = json.loads(failed.body)
    assert failed.status_code == 500 and body["error"]["type"] == "server_error"
    assert body["error"]["request_id"] == failed.headers["x-request-id"] and body["error"]["request_id"] in body["error"]["message"]
    assert ok.status_code == 200 and ev.wer([REFS["jfk.flac"]["text"]], [json.loads(ok.body)["text"]]) <= 0.05


def test_ray_whisper_serve_starts_answers_and_stops_on_sigterm(tmp_path):
    """SIGTERM (a process manager's stop) takes the Ctrl-C path: the endpoint is removed, exit 0."""
    from openai import OpenAI

    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ray_whisper.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if health(url)["status"] == "ok":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the endpoint did not come up"
            time.sleep(1)
        text = OpenAI(base_url=f"{url}/v1", api_key="unused").audio.transcriptions.create(model="whisper-1", file=JFK.open("rb")).text
        assert ev.wer([REFS["jfk.flac"]["text"]], [text]) <= 0.05
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        output = proc.stdout.read()
        assert f"serving bundled:tiny.en on http://127.0.0.1:{port}/v1/audio/transcriptions" in output
        assert "Traceback" not in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
