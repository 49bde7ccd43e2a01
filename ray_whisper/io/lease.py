"""One writer per output directory: a lease object with a heartbeat, taken with an atomic create.

A run takes `_ray_whisper/lease.json` in OUTPUT_DIR before it touches anything there, renews it every
HEARTBEAT_S from a thread of the driver and deletes it on every way out (success, error, Ctrl-C, SIGTERM).
A second run that finds a live lease stops at once (OutputBusyError: exit 2, one line naming the holder).
A lease is dead when its holder's heartbeat is older than its expiry, or at once when the holder is a
process of this machine that no longer exists (a driver killed with SIGKILL or by the OOM killer); a dead
lease is taken over.

Every change is conditional on what was read, so two runs started together cannot both win:
- local disks: the lease is written under a `filelock` (an OS lock, released by the kernel if the process
  dies) and replaced atomically (os.replace), so readers never see half a file;
- S3: a conditional PUT: `If-None-Match: *` to create, `If-Match: <ETag>` to renew or take over, and a
  conditional DELETE to release; a lease's age is measured on the store's clock (its LastModified against
  the response's Date), so clocks that disagree between hosts do not matter;
- other stores: a best-effort lease (check, write, read back), with a warning.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import OutputBusyError, OutputError
from . import storage

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0  # how often the holder renews its lease
EXPIRY_S = 60.0  # a lease not renewed for this long is dead (6 missed heartbeats: a slow store, a long GC)


@dataclass(frozen=True)
class Seen:
    """A lease as read: its record, its age on the store's clock (s since its last write), its version tag."""

    record: dict[str, Any]
    age_s: float
    tag: str


def _identity() -> dict[str, Any]:
    """Who holds a lease: host and pid for people; machine (boot id and pid namespace) and the process's start
    time so that another run on the same machine can tell a dead holder from a live one."""
    import psutil

    machine = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        machine = f.read().strip() + "/" + os.readlink("/proc/self/ns/pid")
    return {"host": socket.gethostname(), "pid": os.getpid(), "machine": machine,
            "pid_started": psutil.Process().create_time()}


def holder_is_gone(record: dict[str, Any]) -> bool:
    """True when the holder was a process of this machine (same boot, same pid namespace) that no longer runs."""
    import psutil

    mine = _identity()
    if not record.get("machine") or record.get("machine") != mine["machine"]:
        return False
    try:
        return abs(psutil.Process(int(record["pid"])).create_time() - float(record["pid_started"])) > 0.01
    except psutil.NoSuchProcess:
        return True
    except (KeyError, TypeError, ValueError, psutil.Error):
        return False


class Lease:
    """A held lease: renewed by a thread until released. `lost` says why it is no longer ours, if so."""

    def __init__(self, store: Any, uri: str, record: dict[str, Any], tag: str):
        self.store, self.uri, self.record, self.tag = store, uri, record, tag
        self.run_id: str = record["run_id"]
        self.lost = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ray_whisper-lease", daemon=True)

    @classmethod
    def acquire(cls, store: Any, uri: str, run_id: str, heartbeat_s: float = HEARTBEAT_S,
                expiry_s: float = EXPIRY_S) -> Lease:
        """Take the lease for `run_id` and start its heartbeat; raises OutputBusyError while another run holds it."""
        now = time.time()
        record = {"tool": "ray_whisper", "run_id": run_id, **_identity(), "started": _iso(now),
                  "heartbeat": _iso(now), "heartbeat_s": heartbeat_s, "expiry_s": expiry_s,
                  "token": secrets.token_hex(8)}
        try:
            tag = cls._take(store, uri, record)
        except OSError as e:  # the store refuses (permissions, no conditional writes, a lock that times out)
            raise OutputError(f"could not take the lease of {uri}: {storage.describe_error(e, uri)}") from e
        lease = cls(store, uri, record, tag)
        lease._thread.start()
        return lease

    @staticmethod
    def _take(store: Any, uri: str, record: dict[str, Any]) -> str:
        """Write `record` as the lease: created, or over a dead one; its version tag."""
        for _ in range(5):  # a lease that changes between the read and the write is read again
            tag = store.create(_encode(record))
            if tag is not None:
                return tag
            seen = store.read()
            if seen is None:
                continue  # released between our create and our read
            if seen.record.get("token") == record["token"]:
                return seen.tag  # our own create, retried by the client after its answer was lost
            why = _dead(seen)
            if not why:
                raise OutputBusyError(busy_message(uri, seen))
            tag = store.replace(_encode(record), seen.tag)
            if tag is not None:
                log.warning("took over the lease of %s from run %s (%s)", uri, seen.record.get("run_id", "?"), why)
                return tag
        raise OutputBusyError(f"{uri}: the lease kept changing under five attempts to take it; another run is "
                              "starting there: wait for it, or give another OUTPUT_DIR")

    def _beat(self) -> None:
        interval = float(self.record["heartbeat_s"])
        while not self._stop.wait(interval):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a store failing now may answer at the next beat (6 misses allowed)
                log.warning("could not renew the lease of %s (will retry): %s", self.uri,
                            storage.describe_error(e, self.uri))
            if self.lost:
                log.error("%s", self.lost)
                return

    def renew(self) -> None:
        record = {**self.record, "heartbeat": _iso(time.time())}
        tag = self.store.replace(_encode(record), self.tag)
        if tag is None:
            seen = self.store.read()
            if seen is not None and seen.record.get("token") == record["token"]:
                tag = seen.tag  # our own write, retried by the client after its answer was lost
            else:
                self.lost = f"this run lost the lease of {self.uri}: {_holder_now(seen)}"
                return
        self.record, self.tag = record, tag

    def confirm(self) -> None:
        """Raise OutputError unless the lease is still ours (checked before a commit changes the directory)."""
        if not self.lost:
            seen = self.store.read()
            if seen is None or seen.record.get("token") != self.record["token"]:
                self.lost = f"this run lost the lease of {self.uri}: {_holder_now(seen)}"
        if self.lost:
            raise OutputError(f"{self.lost}; its parts are kept but it does not commit; rerun the same command once "
                              "the other run is done")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours; never raises (a lease left behind expires)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=float(self.record["heartbeat_s"]))  # a renew stuck in a store's retries
        if self.lost:
            return
        try:
            self.store.delete(self.tag)
        except Exception as e:  # noqa: BLE001 - release runs on the way out of any error and must not hide it
            log.warning("could not release the lease of %s (it expires %g s after its last heartbeat): %s", self.uri,
                        float(self.record["expiry_s"]), storage.describe_error(e, self.uri))


def _holder_now(seen: Seen | None) -> str:
    return "it was removed" if seen is None else f"run {seen.record.get('run_id', '?')} holds it now"


def _dead(seen: Seen) -> str:
    """Why a lease someone else wrote is dead, or "" while it is live."""
    record = seen.record
    expiry = _number(record.get("expiry_s"), EXPIRY_S)
    if seen.age_s > expiry:
        return f"no heartbeat for {seen.age_s:.0f} s, expiry {expiry:g} s"
    if holder_is_gone(record):
        return f"its process {record.get('pid')} on this machine is gone"
    return ""


def busy_message(uri: str, seen: Seen) -> str:
    r = seen.record
    expiry = _number(r.get("expiry_s"), EXPIRY_S)
    holder = (f"run {r.get('run_id', '?')} on host {r.get('host', '?')} (pid {r.get('pid', '?')})" if r.get("run_id")
              else "an unreadable lease")
    return (f"{uri} is in use by {holder}, last heartbeat {seen.age_s:.0f} s ago; wait for it to finish or give "
            f"another OUTPUT_DIR (a lease whose run died expires {expiry:g} s after its last heartbeat)")


@contextlib.contextmanager
def holding(fs: Any, uri: str, path: str, run_id: str, **timing: float) -> Iterator[Lease]:
    """The lease at `path` (on `fs`, for OUTPUT_DIR `uri`) held by `run_id` for the block, released on every exit."""
    lease = Lease.acquire(store_for(fs, uri, path), uri, run_id, **timing)
    try:
        yield lease
    finally:
        lease.release()


def store_for(fs: Any, uri: str, path: str) -> Any:
    if storage.protocol(uri) in storage.S3_PROTOCOLS:
        return S3Store(fs, path)
    if storage.protocol(uri) == "file":
        return LocalStore(path)
    log.warning("%s has no conditional writes that ray_whisper uses: the lease there is best effort (two runs "
                "started within a second of each other may both go ahead)", storage.protocol(uri))
    return FsspecStore(fs, path)


class LocalStore:
    """A lease file changed only under an OS lock beside it, each write an atomic replace."""

    def __init__(self, path: str):
        from filelock import FileLock

        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.lock = FileLock(path + ".lock", timeout=30)

    def read(self) -> Seen | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Seen(_decode(data), max(0.0, time.time() - mtime), hashlib.sha256(data).hexdigest())

    def create(self, data: bytes) -> str | None:
        with self.lock:
            return None if os.path.exists(self.path) else self._write(data)

    def replace(self, data: bytes, tag: str) -> str | None:
        with self.lock:
            seen = self.read()
            return self._write(data) if seen is not None and seen.tag == tag else None

    def delete(self, tag: str) -> bool:
        with self.lock:
            seen = self.read()
            if seen is None or seen.tag != tag:
                return False
            os.remove(self.path)
            return True

    def _write(self, data: bytes) -> str:
        temp = f"{self.path}.{secrets.token_hex(4)}.tmp"
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, self.path)
        return hashlib.sha256(data).hexdigest()


class S3Store:
    """A lease object changed only by conditional requests (If-None-Match / If-Match on its ETag)."""

    def __init__(self, fs: Any, path: str):
        self.fs = fs
        self.bucket, self.key = path.split("/", 1)

    def read(self) -> Seen | None:
        from fsspec.asyn import sync

        try:
            head, data = sync(self.fs.loop, self._get)
        except FileNotFoundError:
            return None
        server_now = _http_date(head["ResponseMetadata"]["HTTPHeaders"].get("date")) or time.time()
        age = server_now - head["LastModified"].timestamp()
        return Seen(_decode(data), max(0.0, age), head["ETag"])

    async def _get(self) -> tuple[dict[str, Any], bytes]:
        out = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        try:
            return out, await out["Body"].read()
        finally:
            out["Body"].close()

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, tag: str) -> str | None:
        return self._put(data, IfMatch=tag)

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data,
                                  ContentType="application/json", **condition)
        except OSError as e:
            if _precondition_failed(e) or (isinstance(e, FileNotFoundError) and "IfMatch" in condition):
                return None  # someone else's write came first, or the lease was released meanwhile
            raise
        return out["ETag"]

    def delete(self, tag: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=tag)
            return True
        except OSError as e:
            if _precondition_failed(e) or isinstance(e, FileNotFoundError):
                return False
            raise


class FsspecStore:
    """Best effort where no conditional write is at hand: check, write, then read back."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    def read(self) -> Seen | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        record = _decode(data)
        age = time.time() - (_from_iso(record.get("heartbeat")) or 0.0)
        return Seen(record, max(0.0, age), hashlib.sha256(data).hexdigest())

    def create(self, data: bytes) -> str | None:
        return None if self.fs.exists(self.path) else self._write(data)

    def replace(self, data: bytes, tag: str) -> str | None:
        seen = self.read()
        return self._write(data) if seen is not None and seen.tag == tag else None

    def delete(self, tag: str) -> bool:
        seen = self.read()
        if seen is None or seen.tag != tag:
            return False
        self.fs.rm(self.path)
        return True

    def _write(self, data: bytes) -> str | None:
        self.fs.pipe_file(self.path, data)
        seen = self.read()
        return seen.tag if seen is not None and seen.tag == hashlib.sha256(data).hexdigest() else None


def _precondition_failed(e: BaseException) -> bool:
    """An S3 answer that the condition did not hold: 412 PreconditionFailed, or 409 when a concurrent conditional
    write won (ConditionalRequestConflict); s3fs raises them as FileExistsError or OSError, the cause chained."""
    if isinstance(e, FileExistsError):
        return True
    response = getattr(e.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=1).encode()


def _decode(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _number(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")


def _from_iso(text: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def _http_date(text: str | None) -> float | None:
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(text).timestamp() if text else None
    except (TypeError, ValueError):
        return None
