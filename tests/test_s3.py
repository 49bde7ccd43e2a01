"""Object storage end to end against a real S3 server: moto in server mode on 127.0.0.1, started as a
subprocess by this module (not the in-process mock), so that s3fs on the driver, s3fs in Ray's workers
and pyarrow all talk HTTP to it as they would to AWS or MinIO.

Credentials travel as on a cluster: tests/conftest.py puts (fake) AWS credentials in the environment
before the session's Ray starts, and the workers inherit them; only the endpoint travels in the options
(--s3-endpoint-url / s3_endpoint_url). A second server with IAM authentication switched on checks wrong
credentials and a denied object (driver side: moto's IAM mode rejects the signature of any S3 request
whose query holds a '/', e.g. a listing, getmoto/moto#5948, so no pipeline runs against it).

Two pipeline runs (slow): the CLI over an S3 manifest (relative, absolute-S3, local and missing audio)
into an S3 output, and the Python API over an S3 glob. Everything else is driver-side and takes seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_whisper import cli, schema
from ray_whisper.io import output, storage
from ray_whisper.batch import pipeline
from ray_whisper.io.audio import fetch_bytes
from ray_whisper.errors import FetchError, redact
from ray_whisper.io.manifest import LISTING, ManifestError, manifest_format, read_manifest
from ray_whisper.config import StorageOptions, TranscribeOptions

from conftest import DATA, REFS, write_wav

IN, OUT = "audio-in", "results"  # the open server's buckets
PRIVATE = "private"  # the bucket of the server that checks credentials


# ---------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def moto_server(log_path: Path):
    """`python -m moto.server` on a free port; yields its URL once it answers, stops it afterwards."""
    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
    for _ in range(3):  # the port may be taken between choosing it and binding it
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            _stop(proc)
            continue
        try:
            yield url
        finally:
            _stop(proc)
        return
    raise RuntimeError(f"moto server did not start; its log:\n{log_path.read_text()[-3000:]}")


def boto(url: str, service: str = "s3", **creds):
    import boto3

    return boto3.client(service, endpoint_url=url, region_name="us-east-1", **creds)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The open server (any credentials accepted), with audio and a manifest uploaded."""
    root = tmp_path_factory.mktemp("s3")
    with moto_server(root / "moto.log") as url:
        client = boto(url)
        client.create_bucket(Bucket=IN)
        client.create_bucket(Bucket=OUT)
        jfk = (DATA / "jfk.flac").read_bytes()
        silence = write_wav(root / "silence.wav", np.zeros(16_000 * 3, dtype=np.float32))
        for key in ("audio/jfk.flac", "audio/nested/jfk copy.flac", "calls/a.flac", "calls/2024/01/b.flac", "other/c.flac"):
            client.put_object(Bucket=IN, Key=key, Body=jfk)
        client.put_object(Bucket=IN, Key="calls/x.wav", Body=silence.read_bytes())
        client.put_object(Bucket=IN, Key="calls/notes.txt", Body=b"not audio\n")
        rows = {  # id -> audio, as a user writes them into a manifest stored next to the audio
            "jfk-relative": "../audio/jfk.flac",
            "jfk-absolute": f"s3://{IN}/audio/nested/jfk copy.flac",
            "silence-local": str(silence),  # a plain path in an S3 manifest
            "missing": "../audio/missing.wav",
        }
        manifest = "id,audio\n" + "".join(f"{i},{a}\n" for i, a in rows.items())
        client.put_object(Bucket=IN, Key="lists/manifest.csv", Body=manifest.encode())
        yield {"url": url, "client": client, "root": root, "rows": rows, "log": root / "moto.log",
               "options": StorageOptions(s3_endpoint_url=url)}


@pytest.fixture(scope="module")
def private_s3(tmp_path_factory):
    """A server that checks credentials: an IAM user 'reader' may get, put and delete objects in
    PRIVATE except audio/denied.wav, and may not list (least privilege). Set up before auth is on."""
    root = tmp_path_factory.mktemp("private")
    with moto_server(root / "moto.log") as url:
        client = boto(url)
        client.create_bucket(Bucket=PRIVATE)
        client.put_object(Bucket=PRIVATE, Key="lists/m.csv", Body=b"audio\n../audio/ok.wav\n../audio/denied.wav\n")
        wav = write_wav(root / "ok.wav", np.zeros(16_000, dtype=np.float32)).read_bytes()
        client.put_object(Bucket=PRIVATE, Key="audio/ok.wav", Body=wav)
        client.put_object(Bucket=PRIVATE, Key="audio/denied.wav", Body=wav)
        iam = boto(url, "iam")
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="audio", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                 "Resource": f"arn:aws:s3:::{PRIVATE}/*"},
                {"Effect": "Deny", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{PRIVATE}/audio/denied.wav"},
            ],
        }))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        # from now on every request must be signed by a known key and allowed by its policy
        req = urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})  # not a form: moto reads the raw body
        assert json.loads(urllib.request.urlopen(req, timeout=10).read())["status"] == "ok"
        yield {"url": url, "key_id": key["AccessKeyId"], "secret": key["SecretAccessKey"],
               "options": StorageOptions(s3_endpoint_url=url)}


def use_credentials(monkeypatch, key_id: str, secret: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


def secrets_in_play(*extra: str) -> list[str]:
    return [s for s in (os.environ.get("AWS_SECRET_ACCESS_KEY"), *extra) if s]


def assert_no_secret(where: str, text: str | bytes, secrets: list[str]) -> None:
    for secret in secrets:
        needle = secret.encode() if isinstance(text, bytes) else secret
        assert needle not in text, f"a secret appears in {where}"


# ---------------------------------------------------------------- manifests and listings (driver only)


def test_s3_manifest_audio_paths_resolve_against_its_prefix(s3):
    uri = f"s3://{IN}/lists/manifest.csv"
    table = read_manifest(uri, storage.filesystem(uri, s3["options"]))
    assert dict(zip(table["id"].to_pylist(), table["audio"].to_pylist())) == {
        "jfk-relative": f"s3://{IN}/audio/jfk.flac",
        "jfk-absolute": f"s3://{IN}/audio/nested/jfk copy.flac",
        "silence-local": s3["rows"]["silence-local"],
        "missing": f"s3://{IN}/audio/missing.wav",
    }


def test_s3_glob_and_prefix_listings(s3):
    opts = s3["options"]

    def listing(uri):
        table = read_manifest(uri, storage.filesystem(uri, opts))
        return dict(zip(table["id"].to_pylist(), table["audio"].to_pylist()))

    glob = f"s3://{IN}/calls/**/*.flac"
    assert manifest_format(glob) == LISTING
    assert listing(glob) == {"2024/01/b.flac": f"s3://{IN}/calls/2024/01/b.flac", "a.flac": f"s3://{IN}/calls/a.flac"}
    assert list(listing(f"s3://{IN}/calls/*.flac")) == ["a.flac"]
    # a prefix takes the audio files at any depth and skips the rest (notes.txt)
    assert list(listing(f"s3://{IN}/calls/")) == ["2024/01/b.flac", "a.flac", "x.wav"]
    with pytest.raises(ManifestError, match="no files match"):
        listing(f"s3://{IN}/calls/**/*.mp3")
    with pytest.raises(ManifestError, match="does not exist"):
        listing("s3://no-such-bucket-7a1/calls/**/*.flac")
    with pytest.raises(ManifestError, match="end it with '/'"):
        listing(f"s3://{IN}/calls")


def test_local_glob_and_folder_listings(tmp_path):
    for rel in ("calls/a.wav", "calls/2024/b.mp3", "calls/2024/01/c.wav", "calls/readme.md", "manifest[1].csv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("audio\ncalls/a.wav\n")
    ids = lambda uri: read_manifest(uri)["id"].to_pylist()
    assert ids(f"{tmp_path}/calls/**/*.wav") == ["2024/01/c.wav", "a.wav"]
    assert ids(f"{tmp_path}/calls/") == ["2024/01/c.wav", "2024/b.mp3", "a.wav"]
    table = read_manifest(f"{tmp_path}/calls/*/*.mp3")
    assert table.to_pylist() == [{"id": "2024/b.mp3", "audio": f"{tmp_path}/calls/2024/b.mp3", "language": None, "prompt": None}]
    # a manifest file whose name merely looks like a glob is read as a manifest
    assert read_manifest(f"{tmp_path}/manifest[1].csv")["audio"].to_pylist() == [f"{tmp_path}/calls/a.wav"]
    with pytest.raises(ManifestError, match="empty or does not exist"):
        read_manifest(f"{tmp_path}/nothing/")


def test_any_fsspec_protocol_works_the_same_way(tmp_path):
    """memory:// stands in for any other fsspec protocol (gs://, az://, ...): manifest, relative audio,
    listing, fetch and output all go through the same filesystem code."""
    fs = storage.filesystem("memory://x")
    fs.pipe("/rw-proto/lists/m.csv", b"id,audio\na,../audio/a.flac\n")
    fs.pipe("/rw-proto/audio/a.flac", (DATA / "jfk.flac").read_bytes())
    table = read_manifest("memory://rw-proto/lists/m.csv", fs)
    assert table["audio"].to_pylist() == ["memory://rw-proto/audio/a.flac"]
    assert read_manifest("memory://rw-proto/audio/", fs)["audio"].to_pylist() == ["memory://rw-proto/audio/a.flac"]
    assert fetch_bytes("memory://rw-proto/audio/a.flac", storage.filesystem("memory://")) == (DATA / "jfk.flac").read_bytes()
    output.OutputDir.open("memory://rw-proto/out").check_writable()


# ---------------------------------------------------------------- fail fast, on the driver


def run_cli(args: list[str], monkeypatch, capsys, caplog) -> tuple[int, str, float]:
    """cli.main with Ray and the model made off-limits: a storage problem must stop the run before either."""

    def no_ray(*a, **k):
        raise AssertionError("Ray was started although the run could not succeed")

    def no_model(*a, **k):
        raise AssertionError("the model was resolved before the storage checks")

    monkeypatch.setattr(pipeline, "connect", no_ray)
    monkeypatch.setattr("ray_whisper.model.checkpoint.resolve_model", no_model)
    caplog.set_level(logging.INFO)
    started = time.perf_counter()
    code = cli.main(["transcribe", *args])
    seconds = time.perf_counter() - started
    captured = capsys.readouterr()
    return code, captured.out + captured.err + caplog.text, seconds


FAST_FAILURES = {
    # name: (manifest, output, expected message); {url} is the open server, {closed} a port nobody listens on
    "output-bucket-missing": (f"s3://{IN}/lists/manifest.csv", "s3://no-such-bucket-7a1/out", r"is not writable: not found"),
    "manifest-key-missing": (f"s3://{IN}/lists/nope.csv", f"s3://{OUT}/never", r"manifest not found: s3://audio-in/lists/nope.csv"),
    "manifest-bucket-missing": ("s3://no-such-bucket-7a1/m.csv", f"s3://{OUT}/never", r"manifest not found"),
    "glob-bucket-missing": ("s3://no-such-bucket-7a1/calls/**/*.mp3", f"s3://{OUT}/never", r"cannot list .* does not exist"),
    "wrong-endpoint": (f"s3://{IN}/lists/manifest.csv", f"s3://{OUT}/never", r"cannot reach the storage endpoint"),
    "endpoint-not-a-url": (f"s3://{IN}/lists/manifest.csv", f"s3://{OUT}/never", r"--s3-endpoint-url must be an http"),
    "endpoint-with-password": (f"s3://{IN}/lists/manifest.csv", f"s3://{OUT}/never", r"must not hold credentials"),
}


@pytest.mark.parametrize("case", list(FAST_FAILURES))
def test_cli_exits_2_fast_with_a_clear_message(case, s3, monkeypatch, capsys, caplog):
    manifest, out, expected = FAST_FAILURES[case]
    endpoint = {
        "wrong-endpoint": f"http://127.0.0.1:{_free_port()}",
        "endpoint-not-a-url": "127.0.0.1:9000",
        "endpoint-with-password": f"http://admin:{os.environ['AWS_SECRET_ACCESS_KEY']}@127.0.0.1:9000",
    }.get(case, s3["url"])
    buckets_before = {b["Name"] for b in s3["client"].list_buckets()["Buckets"]}
    code, text, seconds = run_cli([manifest, out, "--s3-endpoint-url", endpoint], monkeypatch, capsys, caplog)
    print(f"{case}: exit {code} in {seconds:.1f} s: {[l for l in text.splitlines() if 'error:' in l]}")
    assert code == 2, text
    assert re.search(expected, text), text
    assert seconds < (30 if case == "wrong-endpoint" else 10)
    assert {b["Name"] for b in s3["client"].list_buckets()["Buckets"]} == buckets_before  # no bucket made
    assert_no_secret("the CLI's output", text, secrets_in_play())


@pytest.mark.parametrize("problem", ["wrong-secret", "unknown-key"])
@pytest.mark.parametrize("where", ["manifest", "output"])
def test_wrong_credentials_exit_2_with_access_denied(problem, where, private_s3, tmp_path, monkeypatch, capsys, caplog):
    bad_secret = "wrong-secret-" + "x" * 24
    key_id = private_s3["key_id"] if problem == "wrong-secret" else "AKIAUNKNOWNKEY000000"
    use_credentials(monkeypatch, key_id, bad_secret)
    if where == "manifest":
        manifest, expected = f"s3://{PRIVATE}/lists/m.csv", r"manifest not readable \(access denied"
    else:
        local = tmp_path / "m.csv"
        local.write_text("audio\nx.wav\n")
        manifest, expected = str(local), r"is not writable: access denied"
    code, text, seconds = run_cli(
        [manifest, f"s3://{PRIVATE}/out", "--s3-endpoint-url", private_s3["url"]], monkeypatch, capsys, caplog
    )
    assert code == 2, text
    assert re.search(expected, text), text
    assert seconds < 10
    assert_no_secret("the CLI's output", text, [bad_secret, private_s3["secret"]])


def test_right_credentials_read_and_write_and_a_denied_object_is_that_files_error(private_s3, monkeypatch):
    """The positive control of the test above, and the per-file case: with the reader's key the manifest
    reads and the output is writable, and the one object the policy denies becomes an error row, the
    exact code path of a decode task, while its neighbour decodes."""
    from ray_whisper.asr.chunking import ChunkGeometry
    from ray_whisper.batch.cpu_stage import _Collector, file_to_chunks

    use_credentials(monkeypatch, private_s3["key_id"], private_s3["secret"])
    opts = private_s3["options"]
    uri = f"s3://{PRIVATE}/lists/m.csv"
    table = read_manifest(uri, storage.filesystem(uri, opts))
    assert table["audio"].to_pylist() == [f"s3://{PRIVATE}/audio/ok.wav", f"s3://{PRIVATE}/audio/denied.wav"]
    output.OutputDir.open(f"s3://{PRIVATE}/out", opts).check_writable()

    fs = storage.filesystem(uri, opts)
    geom = ChunkGeometry.from_seconds(30.0, 0.0, 8.0)
    out = _Collector()
    for row in table.to_pylist():
        list(file_to_chunks(row, geom, 80, fs, out))
    rows = {r["audio"].rsplit("/", 1)[1]: r for r in out.take().to_pylist()}
    assert rows["ok.wav"]["error"] is None and rows["ok.wav"]["end"] == 16_000
    # the kind, then the reason
    assert rows["denied.wav"]["error"] == f"fetch_error: access denied: s3://{PRIVATE}/audio/denied.wav"

    use_credentials(monkeypatch, private_s3["key_id"], "wrong-secret-" + "y" * 24)
    with pytest.raises(FetchError, match="access denied") as err:
        fetch_bytes(f"s3://{PRIVATE}/audio/ok.wav", storage.filesystem(uri, opts))
    assert_no_secret("a fetch error", str(err.value), secrets_in_play(private_s3["secret"]))


def test_secrets_are_redacted_from_error_messages():
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    with pytest.raises(FetchError) as err:  # a signed URL to a server that is not there
        fetch_bytes(f"http://127.0.0.1:{_free_port()}/a.wav?X-Amz-Credential=AKIA%2Fx&X-Amz-Signature={secret}")
    assert err.value.kind == "fetch_error" and "X-Amz-Signature=***" in str(err.value)
    assert_no_secret("a fetch error", str(err.value), [secret])
    text = redact(f"connect to https://user:{secret}@minio:9000 failed; secret_key={secret}")
    assert secret not in text and "https://user:***@minio:9000" in text


def test_nothing_secret_travels_to_the_workers(s3):
    """What Ray pickles into tasks: the options (decode tasks) and the filesystem (write tasks), after it
    has connected and signed requests. Each worker finds the credentials in its own environment."""
    import pickle

    opts = TranscribeOptions(s3_endpoint_url=s3["url"]).storage.resolved()
    fs = storage.filesystem(f"s3://{OUT}/x", opts)
    assert fs.ls(OUT) is not None  # connected, credentials resolved
    for what, obj in (("options", opts), ("filesystem", storage.arrow_filesystem(fs))):
        blob = pickle.dumps(obj)
        assert_no_secret(f"the pickled {what}", blob, secrets_in_play())
        assert os.environ["AWS_ACCESS_KEY_ID"].encode() not in blob
    assert s3["url"].encode() in pickle.dumps(storage.arrow_filesystem(fs))  # the endpoint does travel


def test_a_run_that_stops_half_way_is_never_taken_for_complete(s3):
    """_SUCCESS goes first when a run begins and comes back last when it finishes: a reader that sees a
    prefix without it knows rows may be missing, whatever the run left behind."""
    opts, uri = s3["options"], f"s3://{OUT}/interrupted"
    fs = storage.filesystem(uri, opts)
    out = output.OutputDir.open(uri, opts)
    first = pa.table({"id": ["a", "b"], "audio": [f"s3://{IN}/{i}.wav" for i in "ab"], "language": [None] * 2})
    todo, done = out.begin(first, "fp", overwrite=False, retry_errors=False)
    part = out.writer("old").write([_ok_row(i) for i in ("a", "b")])
    receipts = pa.table({"id": ["a", "b"], "status": ["ok"] * 2, "duration_s": [1.0] * 2, "error": [None] * 2,
                         "part": [part] * 2, "write_error": [None] * 2}, schema=schema.RECEIPT_SCHEMA)
    out.commit("old", out.complete(first, done, receipts, "old", "m", "fp"), {})
    assert output.read_results(uri, opts).num_rows == 2

    # a new run over a longer manifest starts; a store without atomic uploads could hold a half part
    fs.pipe(f"{OUT}/interrupted/part-new-0000-000001.parquet", b"PAR1 cut short")
    manifest = pa.table({"id": ["a", "b", "c"], "audio": [f"s3://{IN}/{i}.wav" for i in "abc"], "language": [None] * 3})
    todo, done = out.begin(manifest, "fp", overwrite=False, retry_errors=False)
    assert todo["id"].to_pylist() == ["c"]
    assert not fs.exists(f"{OUT}/interrupted/_SUCCESS")
    assert fs.exists(f"{OUT}/interrupted/part-new-0000-000001.parquet")  # not ours: ignored, never deleted
    # ...and dies here: nothing says complete
    with pytest.raises(output.IncompleteOutputError):
        output.read_results(uri, opts)
    # the rerun that finishes gives every manifest row a row (c came back from no worker), then the marker
    out.commit("new", out.complete(manifest, done, schema.RECEIPT_SCHEMA.empty_table(), "new", "m", "fp"), {})
    table = output.read_results(uri, opts)
    assert sorted(table["id"].to_pylist()) == ["a", "b", "c"]
    assert dict(zip(table["id"].to_pylist(), table["status"].to_pylist()))["c"] == "error"


def _ok_row(i: str) -> dict:
    return {"id": i, "audio": f"s3://{IN}/{i}.wav", "text": "hi", "segments": [], "language": "en",
            "duration_s": 1.0, "num_chunks": 1, "model": "m", "fingerprint": "fp", "status": "ok", "error": None}


def test_the_driver_sees_parts_that_workers_wrote_after_it_listed(s3):
    """A resumed run lists the prefix (old parts), then another process adds a part; the next listing must
    see it, or a resume would redo rows that are done (s3fs caches listings by default)."""
    import s3fs

    from ray_whisper.io.parts import marked_table

    opts, uri = s3["options"], f"s3://{OUT}/resume"
    worker = s3fs.S3FileSystem(endpoint_url=s3["url"], skip_instance_cache=True)  # another process's view

    def write_part(name: str, ids: str) -> None:
        with worker.open(f"{OUT}/resume/{name}", "wb") as f:
            pq.write_table(marked_table([_ok_row(i) for i in ids], "w"), f)

    write_part("part-old-0000.parquet", "a")
    manifest = pa.table({"id": ["a", "b"], "audio": [f"s3://{IN}/{i}.wav" for i in "ab"], "language": [None] * 2})
    out = output.OutputDir.open(uri, opts)
    assert out.begin(manifest, "fp", overwrite=False, retry_errors=False)[0]["id"].to_pylist() == ["b"]
    write_part("part-new-0000.parquet", "b")
    todo, done = out.begin(manifest, "fp", overwrite=False, retry_errors=False)
    assert todo.num_rows == 0 and sorted(done["id"].to_pylist()) == ["a", "b"]


# ---------------------------------------------------------------- the pipeline against S3 (slow)


@contextlib.contextmanager
def captured_output():
    """sys.stdout/sys.stderr and every log record at INFO and above, as one text."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def arrow_s3(url: str):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        endpoint_override=url.split("://", 1)[1], scheme="http", region="us-east-1",
        access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture(scope="module")
def cli_run(s3, ray_session, bundled_model):
    """ONE CLI run: S3 manifest -> S3 output, four rows (relative, absolute S3, local, missing)."""
    started = time.perf_counter()
    with captured_output() as buf:
        code = cli.main(["transcribe", f"s3://{IN}/lists/manifest.csv", f"s3://{OUT}/run1", "--s3-endpoint-url", s3["url"]])
    seconds = time.perf_counter() - started
    print(f"\nCLI run against S3: {seconds:.1f} s")
    table = pq.read_table(f"{OUT}/run1", filesystem=arrow_s3(s3["url"]), schema=schema.OUTPUT_SCHEMA)
    return {"code": code, "text": buf.getvalue(), "table": table, "rows": {r["id"]: r for r in table.to_pylist()}}


@pytest.mark.slow
def test_s3_manifest_and_output_with_a_missing_key(cli_run, s3):
    assert cli_run["code"] == 1, cli_run["text"]  # one row failed, so exit 1 (not 2: the run happened)
    rows = cli_run["rows"]
    assert sorted(rows) == sorted(s3["rows"])
    assert cli_run["table"].schema.equals(schema.OUTPUT_SCHEMA)
    ref = REFS["jfk.flac"]["text"]
    from ray_whisper.asr import evaluation as ev

    for name in ("jfk-relative", "jfk-absolute"):
        assert rows[name]["status"] == "ok", rows[name]
        assert ev.wer([ref], [rows[name]["text"]]) <= 0.05
    assert rows["jfk-absolute"]["audio"] == f"s3://{IN}/audio/nested/jfk copy.flac"
    assert rows["silence-local"]["status"] == "ok" and rows["silence-local"]["text"] == ""
    missing = rows["missing"]
    assert missing["status"] == "error" and missing["text"] is None
    assert missing["error"] == f"fetch_error: not found: s3://{IN}/audio/missing.wav"
    assert "files ok: 3   failed: 1" in cli_run["text"] and "errors: fetch_error=1" in cli_run["text"]


@pytest.mark.slow
def test_s3_output_layout_is_committed_and_deterministic(cli_run, s3):
    names = sorted(k["Key"] for k in s3["client"].list_objects_v2(Bucket=OUT, Prefix="run1/")["Contents"])
    parts = [n for n in names if n.startswith("run1/part-")]
    assert "run1/_SUCCESS" in names
    assert parts and all(re.fullmatch(r"run1/part-\d{8}T\d{6}-[0-9a-f]{6}-[0-9a-f]{8}(-lost)?\.parquet", p) for p in parts), names
    index = [n for n in names if n.startswith("run1/_ray_whisper/index-")]
    assert len(index) == 1 and set(names) == set(parts) | set(index) | {"run1/_SUCCESS"}, names
    marker = json.loads(s3["client"].get_object(Bucket=OUT, Key="run1/_SUCCESS")["Body"].read())
    assert marker["index"] == index[0].split("/", 1)[1] and marker["rows"] == 4
    summary = marker["summary"]
    assert (summary["files_ok"], summary["files_failed"]) == (3, 1)
    table = output.read_results(f"s3://{OUT}/run1", s3["options"])
    assert sorted(table["id"].to_pylist()) == sorted(cli_run["rows"])


@pytest.mark.slow
def test_secret_never_printed_logged_or_written(cli_run, s3, ray_session):
    secrets = secrets_in_play()
    assert "files ok:" in cli_run["text"]  # the capture did capture
    assert_no_secret("the CLI's stdout/stderr/log", cli_run["text"], secrets)
    client = s3["client"]
    for obj in client.list_objects_v2(Bucket=OUT, Prefix="run1/")["Contents"]:
        assert_no_secret(obj["Key"], client.get_object(Bucket=OUT, Key=obj["Key"])["Body"].read(), secrets)
    # every log file of the Ray session: the workers' stdout/stderr and Ray's own logs
    logs = Path(ray_session._private.worker.global_worker.node.get_logs_dir_path())
    scanned = 0
    for path in logs.rglob("*"):
        if path.is_file():
            assert_no_secret(f"Ray log {path.name}", path.read_bytes(), secrets)
            scanned += 1
    assert scanned
    assert_no_secret("the S3 server's log", s3["log"].read_bytes(), secrets)


@pytest.mark.slow
def test_glob_manifest_through_the_python_api(s3, ray_session, bundled_model):
    import ray_whisper
    from ray_whisper.asr import evaluation as ev

    started = time.perf_counter()
    summary = ray_whisper.transcribe(f"s3://{IN}/calls/**/*.flac", f"s3://{OUT}/glob/", s3_endpoint_url=s3["url"])
    print(f"\nglob run against S3: {time.perf_counter() - started:.1f} s")
    assert (summary.files_ok, summary.files_failed) == (2, 0)
    table = ray_whisper.read_results(f"s3://{OUT}/glob/", StorageOptions(s3_endpoint_url=s3["url"]))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["2024/01/b.flac", "a.flac"]
    assert rows["a.flac"]["audio"] == f"s3://{IN}/calls/a.flac"
    for row in rows.values():
        assert row["status"] == "ok" and ev.wer([REFS["jfk.flac"]["text"]], [row["text"]]) <= 0.05
