"""Real servers on loopback for the remote-data tests: an S3-compatible store and plain HTTP.

- `S3Store`: moto's standalone server (`moto_server`, from the `moto[server]` test extra) in its
  own process, with IAM authentication on, so wrong or missing credentials fail as they would
  against a real store. It creates one IAM user with full access; `env` is the environment a
  gannet process needs (AWS_ENDPOINT_URL and that user's keys, no config files, no instance
  metadata lookups).
- `FlakyServer`: a threaded HTTP/1.1 server that either serves a folder (with Range requests and
  ETags, as web servers and CDNs do) or forwards every request to another server (then it sits in
  front of the S3 store). Every `every`-th request fails, in turn: a 503, a connection reset
  before any response, or a body cut off half way. `always_fail` names paths that fail every time.

Nothing here is a mock: gannet's processes talk to these servers over TCP, as they would to a
cluster's store.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3

from tests.conftest import process_env

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "upgrade", "te"}
FULL_ACCESS = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def clean_aws_env(**extra: str) -> dict[str, str]:
    """This process's environment minus every AWS setting of the caller, plus `extra`: tests never
    read a developer's ~/.aws, and never wait on the EC2 metadata service."""
    env = process_env()  # carries no AWS_* variable of the caller
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return env


class S3Store:
    """moto's S3 server in a subprocess on 127.0.0.1, with authentication (see the module docstring)."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # The first 3 requests go unauthenticated (moto's switch): they create the user, its key and
        # its policy; every request after that must be signed with a key moto knows.
        server_env = {**clean_aws_env(), "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                         str(self.port)], env=server_env, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process)
        iam = boto3.session.Session(aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap").client(
            "iam", region_name="us-east-1", endpoint_url=self.endpoint)
        iam.create_user(UserName="gannet")
        key = iam.create_access_key(UserName="gannet")["AccessKey"]
        iam.put_user_policy(UserName="gannet", PolicyName="all", PolicyDocument=FULL_ACCESS)
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.env = clean_aws_env(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=self.key_id,
                                 AWS_SECRET_ACCESS_KEY=self.secret)

    def client(self, endpoint: str | None = None):
        return boto3.session.Session(aws_access_key_id=self.key_id, aws_secret_access_key=self.secret).client(
            "s3", region_name="us-east-1", endpoint_url=endpoint or self.endpoint)

    def upload(self, folder: Path, bucket: str, prefix: str, pattern: str = "*.tar") -> list[str]:
        client = self.client()
        if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=bucket)
        urls = []
        for path in sorted(folder.glob(pattern)):
            client.upload_file(str(path), bucket, f"{prefix}{path.name}")
            urls.append(f"s3://{bucket}/{prefix}{path.name}")
        return urls

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # clients hanging up on a cut body are expected
        pass


class FlakyServer:
    """A real HTTP server on loopback that fails every `every`-th request (see the module docstring)."""

    FAILURES = ("503", "reset", "cut")

    def __init__(self, *, root: Path | None = None, upstream: str | None = None, every: int = 0,
                 always_fail: tuple[str, ...] = ()):
        assert (root is None) != (upstream is None)
        self.root, self.every, self.always_fail = root and root.resolve(), every, always_fail
        self.upstream = upstream.split("://", 1)[1] if upstream else None
        self.requests, self.failed = 0, {kind: 0 for kind in self.FAILURES}
        self._lock = threading.Lock()
        self._kinds = itertools.cycle(self.FAILURES)
        self.httpd = QuietServer(("127.0.0.1", 0), self._handler())
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    def _failure(self, path: str) -> str | None:
        """Which failure (if any) this request gets; counts every request."""
        with self._lock:
            self.requests += 1
            if any(part in path for part in self.always_fail):
                kind = "503"
            elif self.every and self.requests % self.every == 0:
                kind = next(self._kinds)
            else:
                return None
            self.failed[kind] += 1
            return kind

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: pytest shows failures, not access logs
                pass

            def do_GET(self) -> None:
                self.respond()

            def do_HEAD(self) -> None:
                self.respond()

            def do_PUT(self) -> None:
                self.respond()

            def do_POST(self) -> None:
                self.respond()

            def do_DELETE(self) -> None:
                self.respond()

            def respond(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                failure = server._failure(self.path)
                if failure == "reset":  # RST before any response: a connection reset by peer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if failure == "503" or (failure == "cut" and self.command != "GET"):
                    self.send(503, {"Content-Type": "text/plain", "Retry-After": "0"}, b"flaky: try again")
                    return
                status, headers, payload = self.forward(body) if server.upstream else self.serve_file()
                if failure == "cut" and len(payload) > 1:  # promise the whole body, send half, hang up
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                self.send(status, headers, payload)

            def send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
                conn = http.client.HTTPConnection(server.upstream, timeout=60)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():  # Host as the client signed it
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        conn.putheader(name, value)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                response = conn.getresponse()
                payload = b"" if self.command == "HEAD" else response.read()
                headers = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}}
                if self.command == "HEAD" and response.getheader("Content-Length"):
                    headers["Content-Length"] = response.getheader("Content-Length")
                conn.close()
                return response.status, headers, payload

            def serve_file(self) -> tuple[int, dict[str, str], bytes]:
                path = server.root / self.path.split("?")[0].lstrip("/")
                if not path.is_file() or server.root not in path.resolve().parents:
                    return 404, {"Content-Type": "text/plain"}, b"not found"
                data = path.read_bytes()
                headers = {"Content-Type": "application/x-tar", "Accept-Ranges": "bytes",
                           "ETag": f'"{hashlib.md5(data).hexdigest()}"'}
                wanted = self.headers.get("Range", "")
                if wanted.startswith("bytes=") and wanted.endswith("-"):
                    start = int(wanted[6:-1])
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return 206, headers, data[start:]
                return 200, headers, data

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
