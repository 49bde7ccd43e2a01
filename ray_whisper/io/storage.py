"""One filesystem for every path of a run: manifest, audio and output, local or object storage.

The options below build one fsspec filesystem per protocol on the driver; the same options travel to
the workers, which build the same filesystem, so the driver and every worker agree on endpoint and
credentials. Secrets are read from the environment or AWS profiles by s3fs/botocore and never pass
through our options, logs or errors.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from functools import lru_cache
from typing import Any

from ..config import StorageOptions
from ..errors import redact, redact_query


def protocol(uri: str) -> str:
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else "file"


S3_PROTOCOLS = ("s3", "s3a")
# Stores without real directories: nothing to create before writing, and creating one would create a bucket.
OBJECT_STORE_PROTOCOLS = S3_PROTOCOLS + ("gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2")
# The environment that decides which credentials and endpoint a process uses: a cached filesystem is
# reused only while these are unchanged (a notebook that switches AWS_PROFILE gets a new one).
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE",
)


# query parameters of presigned / SAS URLs (S3, GCS, Azure): secret, or changing each time a URL is signed
PRESIGN_PARAMS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-amz-date", "x-amz-expires",
    "signature", "expires", "awsaccesskeyid", "x-goog-signature", "x-goog-credential", "x-goog-date",
    "x-goog-expires", "googleaccessid", "sig", "se", "st", "skoid", "sktid", "skt", "ske", "sks", "skv",
})


def _without_password(netloc: str) -> str:
    if "@" not in netloc:
        return netloc
    user, _, host = netloc.rpartition("@")
    return f"{user.split(':', 1)[0]}:***@{host}" if ":" in user else netloc


def public_uri(uri: str) -> str:
    """The URI as it may be shown and stored: a URL's password and the value of every query parameter that
    is not known to be harmless (errors.HARMLESS_QUERY_PARAMS: format, versionId, ...) replaced by ***, so
    that access_token=, api_key= or a signature never reach the output or a log."""
    if "://" not in uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    fragment = redact_query(parts.fragment) if "=" in parts.fragment else parts.fragment
    return urllib.parse.urlunsplit((parts.scheme, _without_password(parts.netloc), parts.path,
                                    redact_query(parts.query), fragment))


def stable_uri(uri: str) -> str:
    """What a default id is derived from (manifest.stable_id): the URI without its password and the values
    of its signing parameters (PRESIGN_PARAMS), so a re-signed URL keeps its id, while URLs that differ in
    any other parameter (?file=a.mp3, ?file=b.mp3) keep different ids. Hashed, never shown."""
    if "://" not in uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    query = "&".join(
        f"{k}=***" if k.lower() in PRESIGN_PARAMS else (f"{k}={v}" if v or "=" in pair else k)
        for pair in parts.query.split("&") if pair
        for k, _, v in [pair.partition("=")]
    )
    return urllib.parse.urlunsplit((parts.scheme, _without_password(parts.netloc), parts.path, query, parts.fragment))


def is_object_store(uri: str) -> bool:
    return protocol(uri) in OBJECT_STORE_PROTOCOLS


def filesystem(uri: str, storage: StorageOptions | None = None) -> Any:
    """The fsspec filesystem for `uri` under `storage` (cached per process and AWS environment)."""
    proto = protocol(uri)
    env = _env_token() if proto in S3_PROTOCOLS else ""
    return _filesystem(proto, storage or StorageOptions(), env)


def _env_token() -> str:
    """A digest of the AWS environment (the cache key holds no secret in clear)."""
    values = "\0".join(f"{name}={os.environ.get(name, '')}" for name in _AWS_ENV)
    return hashlib.sha256(values.encode()).hexdigest()


FETCH_ATTEMPTS = 3  # a fetch that times out, cannot connect, or gets a 5xx or 429 is tried this many times in all
BACKOFF_S = 1.0  # before the second attempt; doubled before each next one


@lru_cache(maxsize=16)
def _filesystem(proto: str, storage: StorageOptions, env_token: str) -> Any:
    import fsspec

    timeout = storage.fetch_timeout_s
    if proto in ("http", "https"):
        import aiohttp

        # aiohttp's default has no read timeout: a server that accepts and never answers hung the run
        limits = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        return fsspec.filesystem(proto, skip_instance_cache=True, client_kwargs={"timeout": limits})
    if proto in S3_PROTOCOLS:
        import s3fs

        storage = storage.resolved()
        kwargs: dict[str, Any] = {"anon": storage.s3_anonymous}
        if storage.s3_endpoint_url:
            kwargs["endpoint_url"] = storage.s3_endpoint_url
        if storage.s3_profile:
            kwargs["profile"] = storage.s3_profile
        if storage.s3_region:
            kwargs["client_kwargs"] = {"region_name": storage.s3_region}
        # No listings cache: other processes (Ray's write tasks, other runs) change the prefixes this
        # process lists, and a stale listing would hide parts or _SUCCESS. Only these non-secret kwargs
        # travel when the filesystem is pickled to Ray's write tasks; each process finds the credentials
        # itself. skip_instance_cache: this function is the cache, keyed on the environment too.
        kwargs["use_listings_cache"] = False
        # botocore's own standard retry mode (backoff with jitter) for throttling and transient errors
        kwargs["config_kwargs"] = {"connect_timeout": timeout, "read_timeout": timeout,
                                   "retries": {"max_attempts": FETCH_ATTEMPTS, "mode": "standard"}}
        return s3fs.S3FileSystem(skip_instance_cache=True, **kwargs)
    if proto == "file":
        return fsspec.filesystem("file", auto_mkdir=True)
    return fsspec.filesystem(proto)


def strip(uri: str, fs: Any) -> str:
    """The path the filesystem wants (s3://b/k -> b/k; a local path made absolute)."""
    if protocol(uri) == "file":
        return os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)
    return fs._strip_protocol(uri)


def arrow_filesystem(fs: Any) -> Any:
    """A pyarrow filesystem backed by the fsspec one, for Ray's readers and writers."""
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _chain(e: BaseException | None, depth: int = 8) -> list[BaseException]:
    """`e` and the errors it was raised from (fsspec wraps the real cause of a failed HTTP read)."""
    out: list[BaseException] = []
    while e is not None and len(out) < depth:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def network_failure(e: BaseException) -> str | None:
    """"timed out" or "unreachable" when `e`, or an error it was raised from, is a timeout or a failed
    connection (fsspec's HTTP filesystem reports both as FileNotFoundError, the real cause chained); else None."""
    for cause in _chain(e):
        name = type(cause).__name__
        if isinstance(cause, TimeoutError) or "Timeout" in name:
            return "timed out"
        if isinstance(cause, ConnectionError) or any(w in name for w in ("Connect", "Connection", "Endpoint")):
            return "unreachable"
    return None


def http_failure(e: BaseException) -> tuple[str, bool] | None:
    """What an HTTP server answered, when that is why `e` (or an error it was raised from) happened, and whether
    another try may help: 5xx and 429 may pass, a redirect loop or a refusal will not. None for no HTTP answer,
    and for 404 (fsspec reports it as FileNotFoundError: "not found")."""
    for cause in _chain(e):
        if type(cause).__name__ == "TooManyRedirects":  # aiohttp, after 10 redirects
            return "redirect loop (too many redirects)", False
        status = getattr(cause, "status", None)
        if not isinstance(status, int) or getattr(cause, "request_info", None) is None:  # aiohttp.ClientResponseError
            continue
        if status >= 500:
            return f"server error {status}", True
        if status == 429:
            return "rate limited (429 Too Many Requests)", True
        if status in (401, 403):
            return f"access denied ({status})", False
        if status != 404:
            return f"HTTP {status}", False
    return None


def describe_error(e: BaseException, uri: str = "") -> str:
    """One secret-free line saying why a storage call on `uri` failed, the usual cause first, with advice that
    fits a local path or a store."""
    name = type(e).__name__
    detail = redact(" ".join(str(e).split()))[:300] or name
    local = bool(uri) and protocol(uri) == "file"
    network = network_failure(e)
    if network:
        cause = (f"cannot reach the storage endpoint ({network}; check --s3-endpoint-url / AWS_ENDPOINT_URL, "
                 "--fetch-timeout-s and the network)")
    elif isinstance(e, FileNotFoundError):
        cause = "not found (no such file or directory)" if local else "not found (no such bucket, prefix or file)"
    elif isinstance(e, PermissionError):
        cause = ("permission denied (check the file's and its folders' permissions)" if local else
                 "access denied (check the credentials and the bucket's policy)")
    elif "NoCredentials" in name or "PartialCredentials" in name:
        cause = ("no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                 "or --s3-anonymous for public buckets)")
    else:
        cause = "storage error"
    return f"{cause}: {name}: {detail}"
