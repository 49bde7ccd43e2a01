"""One filesystem for every path of a run: manifest, audio and output, local or object storage.

The options below build one fsspec filesystem per protocol on the driver; the same options travel to
the workers, which build the same filesystem, so the driver and every worker agree on endpoint and
credentials. Secrets are read from the environment or AWS profiles by s3fs/botocore and never pass
through our options, logs or errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .config import _opt


@dataclass(frozen=True)
class StorageOptions:
    """S3 settings (AWS, MinIO, Ceph, R2...). Credentials come from the usual AWS environment variables
    or profiles, never from flags, so that they cannot end up in shell history or logs."""

    s3_endpoint_url: str | None = _opt(
        None, "S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: AWS, or "
        "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL).", "storage", "URL",
    )
    s3_region: str | None = _opt(None, "S3 region (default: AWS_REGION / the profile's region).", "storage")
    s3_profile: str | None = _opt(None, "AWS profile name from ~/.aws (default: AWS_PROFILE).", "storage")
    s3_anonymous: bool = _opt(False, "Read public buckets without credentials.", "storage")


def protocol(uri: str) -> str:
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else "file"


def filesystem(uri: str, storage: StorageOptions | None = None) -> Any:
    """The fsspec filesystem for `uri` under `storage` (cached per process)."""
    return _filesystem(protocol(uri), storage or StorageOptions())


@lru_cache(maxsize=16)
def _filesystem(proto: str, storage: StorageOptions) -> Any:
    import fsspec

    if proto in ("s3", "s3a"):
        import os

        import s3fs

        kwargs: dict[str, Any] = {"anon": storage.s3_anonymous}
        endpoint = storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if storage.s3_profile:
            kwargs["profile"] = storage.s3_profile
        if storage.s3_region:
            kwargs["client_kwargs"] = {"region_name": storage.s3_region}
        return s3fs.S3FileSystem(**kwargs)
    if proto == "file":
        return fsspec.filesystem("file", auto_mkdir=True)
    return fsspec.filesystem(proto)


def strip(uri: str, fs: Any) -> str:
    """The path the filesystem wants (s3://b/k -> b/k; a local path made absolute)."""
    if protocol(uri) == "file":
        import os

        return os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)
    return fs._strip_protocol(uri)


def arrow_filesystem(fs: Any) -> Any:
    """A pyarrow filesystem backed by the fsspec one, for Ray's readers and writers."""
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def redact(text: str) -> str:
    """Remove secrets from a message: the values of the AWS secret variables of this process, and
    anything written as secret=..., signature=... (signed URLs)."""
    import os

    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    return re.sub(
        r"(?i)(secret[_-]?(access[_-]?)?key|secret|password|token|signature|x-amz-signature|x-amz-credential|"
        r"x-amz-security-token)(['\"]?\s*[=:]\s*['\"]?)([^&\s'\",}]+)",
        r"\1\3***",
        text,
    )
