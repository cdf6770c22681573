"""Shards where clusters keep them: S3-compatible object stores (`s3://`) and web servers (`http(s)://`).

Clients: boto3 for S3 and urllib3 for plain HTTP. boto3 is the reference AWS SDK, so endpoint,
region and credentials come from exactly where AWS users already put them (AWS_ENDPOINT_URL,
AWS_PROFILE, AWS_ACCESS_KEY_ID/..., ~/.aws/config and credentials, instance roles), and any
S3-compatible store (MinIO, Ceph, R2, moto) works by endpoint alone. urllib3 is what boto3
itself sends requests with. fsspec/s3fs would add an async layer and a narrowly pinned
aiobotocore; WebDataset's own openers shell out to `curl`/`aws` with no retries and no error
detail.

Retries are gannet's, not the libraries': both clients are told not to retry, and one loop here
retries every transient failure (connection refused or reset, timeouts, 429 and 5xx, a body cut
short) with exponential backoff. That gives one policy and one counter (`ReadStats.retries`,
logged as `data/retries`) for a failed request and for a connection that breaks in the middle of
a shard, which no client library resumes: the read continues with a Range request from the byte
it reached (pinned to the object's ETag), so a retried shard yields exactly the bytes, and the
samples, of an unbroken read, and the stream's resume position stays exact.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import io
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

from gannet.trainer.errors import ConfigError

log = logging.getLogger("gannet.remote")
SCHEMES = ("s3://", "http://", "https://")
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
CHUNK = 1 << 20


def is_remote(url: str) -> bool:
    return url.startswith(SCHEMES)


@dataclass
class RetryPolicy:
    """How hard to try: `retries` more attempts after a transient failure, waiting `backoff` s, then
    twice that, ... (capped at 30 s, with jitter so that many loader workers do not retry in step)."""

    retries: int = 5
    backoff: float = 0.5

    def delay(self, attempt: int) -> float:
        return min(30.0, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)


@dataclass
class ReadStats:
    """Transient failures retried so far by one process (a loader worker)."""

    retries: int = 0


class TransientError(OSError):
    """A failure worth retrying (the network or the server, not the request)."""


class RemoteError(OSError):
    """A remote read that failed for good: a permanent error, or retries exhausted."""


def split_s3(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"{url!r} is not an s3://BUCKET/KEY URL")
    return parts.netloc, parts.path.lstrip("/")


# ---------------------------------------------------------------------------------------------
# Clients: one per process (boto3 clients and urllib3 pools must not cross a fork), created on first
# use, so every loader worker builds its own.

@functools.lru_cache(maxsize=None)
def _s3_client(pid: int, retrying: bool):
    import boto3
    from botocore.config import Config

    for name in ("boto3", "botocore", "s3transfer"):  # their INFO lines ("Found credentials in ...") are noise here
        logging.getLogger(name).setLevel(logging.WARNING)

    # A fresh session reads the environment and config files now (boto3's default session would
    # keep whatever credentials it saw first). Reads: no SDK retries, gannet's loop counts them.
    # Writes (`gannet shards --out s3://`): the SDK's standard retry mode, per request and per part.
    retries = {"mode": "standard", "total_max_attempts": 6 if retrying else 1}
    return boto3.session.Session().client("s3", config=Config(retries=retries, connect_timeout=10, read_timeout=60))


def s3_client(retrying: bool = False):
    return _s3_client(os.getpid(), retrying)


@functools.lru_cache(maxsize=None)
def _http_pool(pid: int):
    import urllib3

    return urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=10, read=60))


def _transient_types() -> tuple[type[BaseException], ...]:
    import botocore.exceptions as bx
    import urllib3.exceptions as ux

    return (TransientError, ConnectionError, TimeoutError, bx.HTTPClientError, bx.ConnectionError,
            bx.IncompleteReadError, ux.HTTPError)


def _s3_failure(url: str, exn: Exception) -> Exception:
    """A botocore ClientError as TransientError (5xx, throttling) or a permanent RemoteError."""
    response = getattr(exn, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = response.get("Error", {}).get("Code", "")
    if status in TRANSIENT_STATUS or code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"):
        return TransientError(f"{url}: HTTP {status} {code}".strip())
    return RemoteError(f"{url}: {code or status}: {response.get('Error', {}).get('Message', exn)}")


# ---------------------------------------------------------------------------------------------
# Reading

class RemoteShard(io.RawIOBase):
    """One remote object read front to back, surviving broken connections (see the module docstring)."""

    def __init__(self, url: str, policy: RetryPolicy, stats: ReadStats):
        super().__init__()
        self.url, self.policy, self.stats = url, policy, stats
        self.pos, self.size, self.etag = 0, None, None
        self._body = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._open()
                if self.size is not None and self.pos >= self.size:
                    return 0
                data = self._body.read(min(len(buffer), CHUNK))
                if not data and (self.size is None or self.pos < self.size):
                    if self.size is None:
                        return 0
                    raise TransientError(f"{self.url}: connection closed at byte {self.pos} of {self.size}")
                buffer[: len(data)] = data
                self.pos += len(data)
                return len(data)
            except _transient_types() as exn:
                self._drop()
                if failures >= self.policy.retries:
                    raise RemoteError(f"{self.url}: gave up after {failures + 1} attempts at byte {self.pos} "
                                      f"({type(exn).__name__}: {exn})") from exn
                self.stats.retries += 1
                log.info("retrying %s from byte %d (%s: %s)", self.url, self.pos, type(exn).__name__, exn)
                time.sleep(self.policy.delay(failures))
                failures += 1

    def _open(self) -> None:
        if self.url.startswith("s3://"):
            self._open_s3()
        else:
            self._open_http()

    def _open_s3(self) -> None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(self.url)
        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        if self.etag:
            extra["IfMatch"] = self.etag  # the same object as the bytes already read, or a clear error
        try:
            response = s3_client().get_object(Bucket=bucket, Key=key, **extra)
        except ClientError as exn:
            raise _s3_failure(self.url, exn) from None
        self.etag = self.etag or response.get("ETag")
        self.size = self.pos + response["ContentLength"]
        self._body = response["Body"]

    def _open_http(self) -> None:
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        if self.pos and self.etag:
            headers["If-Range"] = self.etag  # a changed file comes back whole (200), caught below
        response = _http_pool(os.getpid()).request("GET", self.url, headers=headers, preload_content=False,
                                                   decode_content=False)
        if response.status in TRANSIENT_STATUS:
            response.release_conn()
            raise TransientError(f"{self.url}: HTTP {response.status}")
        if response.status not in (200, 206):
            response.release_conn()
            raise RemoteError(f"{self.url}: HTTP {response.status} {response.reason}")
        length = response.headers.get("Content-Length")
        if self.pos and response.status == 200:  # the server ignored the Range: skip what was read
            if self.etag and response.headers.get("ETag") not in (None, self.etag):
                response.release_conn()
                raise RemoteError(f"{self.url} changed while it was being read")
            skip = self.pos
            while skip:
                skipped = len(response.read(min(skip, CHUNK)))
                if not skipped:
                    raise TransientError(f"{self.url}: connection closed while skipping to byte {self.pos}")
                skip -= skipped
            self.size = int(length) if length else None
        else:
            self.size = self.pos + int(length) if length else None
        self.etag = self.etag or response.headers.get("ETag")
        self._body = response

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 (a broken connection may fail to close; it is dropped anyway)
                pass

    def close(self) -> None:
        self._drop()
        super().close()


def open_shard(url: str, policy: RetryPolicy | None = None, stats: ReadStats | None = None) -> io.BufferedReader:
    """A readable binary stream of a remote shard (see RemoteShard)."""
    return io.BufferedReader(RemoteShard(url, policy or RetryPolicy(), stats or ReadStats()), buffer_size=CHUNK)


# ---------------------------------------------------------------------------------------------
# Naming shards: patterns, listings, and a check at start-up

def expand(url: str, policy: RetryPolicy | None = None) -> list[str]:
    """One brace-expanded remote URL -> shard URLs. `s3://bucket/prefix/` lists the .tar objects
    under the prefix, `s3://bucket/prefix/train-*.tar` lists and filters; an HTTP server cannot be
    listed, so HTTP shards are named one by one or by a brace pattern. Failures are one-line
    ConfigErrors: this runs before anything starts."""
    if url.startswith("s3://") and (url.endswith("/") or glob.has_magic(url)):
        pattern = url if glob.has_magic(url) else url + "*.tar"
        found = [u for u in list_s3(pattern.split("*")[0].split("?")[0].split("[")[0], policy) if fnmatch.fnmatchcase(u, pattern)]
        if not found:
            raise ConfigError(f"no shard in the object store matches {pattern!r}")
        return found
    if url.endswith("/") or glob.has_magic(url):
        raise ConfigError(f"{url!r}: a web server cannot be listed; name the shards with a brace pattern, "
                          f"e.g. {url.rstrip('/*')}/train-{{000000..000099}}.tar")
    check(url, policy)
    return [url]


def list_s3(prefix_url: str, policy: RetryPolicy | None = None) -> list[str]:
    """The URLs of all objects whose keys start with the prefix (any depth), sorted."""
    bucket, prefix = split_s3(prefix_url)
    urls: list[str] = []

    def page() -> None:
        urls.clear()
        for response in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            urls.extend(f"s3://{bucket}/{item['Key']}" for item in response.get("Contents", []))

    _with_retries(prefix_url, page, policy or RetryPolicy())
    return sorted(urls)


def check(url: str, policy: RetryPolicy | None = None) -> None:
    """Read the first byte of `url`: wrong credentials, a missing bucket or shard, an unreachable
    endpoint are found now, in one line, not as a stream of skipped shards later."""

    def first_byte() -> None:
        with RemoteShard(url, RetryPolicy(retries=0), ReadStats()) as shard:  # unbuffered: asks for 1 byte, not 1 MB
            shard.read(1)

    _with_retries(url, first_byte, policy or RetryPolicy())


def _with_retries(url: str, call: Callable[[], None], policy: RetryPolicy) -> None:
    """Run `call` (retrying transient failures); any failure left is a ConfigError naming its cause."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    for attempt in range(policy.retries + 1):
        try:
            call()
            return
        except (NoCredentialsError, PartialCredentialsError) as exn:
            raise ConfigError(f"{url}: {exn}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                              f"(a profile in ~/.aws/credentials)") from None
        except ClientError as exn:
            failure = _s3_failure(url, exn)
            if isinstance(failure, RemoteError):
                raise ConfigError(_explain(str(failure))) from None
            last: Exception = failure
        except RemoteError as exn:
            cause = exn.__cause__
            if isinstance(cause, (TransientError, *_transient_types())):
                last = exn
            else:
                raise ConfigError(_explain(str(exn))) from None
        except (BotoCoreError, *_transient_types()) as exn:
            last = exn
        if attempt < policy.retries:
            time.sleep(policy.delay(attempt))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
    where = f" (S3 endpoint: {endpoint})" if url.startswith("s3://") else ""
    raise ConfigError(f"{url}: unreachable after {policy.retries + 1} attempts{where}: {type(last).__name__}: {last}")


HINTS = {
    "InvalidAccessKeyId": "the access key is not known to this store: check AWS_ACCESS_KEY_ID / AWS_PROFILE and AWS_ENDPOINT_URL",
    "SignatureDoesNotMatch": "the secret key is wrong: check AWS_SECRET_ACCESS_KEY / AWS_PROFILE",
    "AccessDenied": "these credentials may not read it: check the bucket policy or AWS_PROFILE",
    "NoSuchBucket": "no such bucket at this endpoint: check the URL and AWS_ENDPOINT_URL",
    "NoSuchKey": "no such shard: check the pattern (`gannet shards ... --out s3://BUCKET/PREFIX/` writes them)",
    "HTTP 404": "no such file on the server: check the pattern",
}


def _explain(message: str) -> str:
    hint = next((text for code, text in HINTS.items() if code in message), "")
    return f"{message}{' (' + hint + ')' if hint else ''}"


# ---------------------------------------------------------------------------------------------
# Writing (`gannet shards ... --out s3://bucket/prefix/`)

def check_writable(url: str) -> None:
    """The bucket exists and these credentials reach it, before minutes of conversion."""
    bucket, _ = split_s3(url)
    _with_retries(url, lambda: s3_client().head_bucket(Bucket=bucket), RetryPolicy(retries=2))


def upload_file(path: Path, url: str) -> str:
    """Upload one file to the object `url` (an s3:// URL) and delete the local copy; returns the URL.

    One PutObject (multipart above 8 MB, completed in one call): S3 makes an object visible only
    once it is whole, so a reader never sees a half-written shard."""
    bucket, key = split_s3(url)
    s3_client(retrying=True).upload_file(str(path), bucket, key)
    Path(path).unlink()
    return url


def upload_folder(folder: Path, url: str, replace: Iterable[str], uploaded: Iterable[str] = ()) -> list[str]:
    """Upload (and delete locally) every file left under `folder` to the prefix `url`, then delete the
    `{split}-*.tar` objects of each split in `replace` that neither this call nor `uploaded` wrote:
    a re-run with fewer shards leaves none of the old set behind. Returns all URLs written."""
    prefix_url = url if url.endswith("/") else url + "/"
    bucket, prefix = split_s3(prefix_url)
    written = list(uploaded)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        written.append(upload_file(path, prefix_url + path.relative_to(folder).as_posix()))
    fresh = set(written)
    client = s3_client(retrying=True)
    for split in replace:
        for stale in list_s3(f"{prefix_url}{split}-"):
            if stale not in fresh and fnmatch.fnmatchcase(stale, f"{prefix_url}{split}-*.tar"):
                client.delete_object(Bucket=bucket, Key=split_s3(stale)[1])
    return written


def parent(url: str) -> str:
    """The 'folder' of a remote shard URL (for the held-out split beside the training shards)."""
    return url.rsplit("/", 1)[0]
