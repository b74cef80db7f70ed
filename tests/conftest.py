"""Shared fixtures: S3 test servers on 127.0.0.1 (see s3servers.py).

- ``moto_s3``: moto, reset before each test (fast; for unit tests of the s3:// code paths).
- ``seaweed_s3``: a real SeaweedFS server started once per session; mark tests using it ``@pytest.mark.s3``.
  It is running at the start of every test (restarted if an earlier test stopped it); use
  ``seaweed_s3.fresh_url()`` for an empty prefix, since data persists for the session.
Use either with ``server.apply_env(monkeypatch)`` (or ``monkeypatch.setenv`` over ``server.env()``) so that
``storage.fs`` and subprocesses reach it.
"""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernels of sfd_core.kernels run in Triton's interpreter on CPU tensors (read when the
# kernels are defined, so set before anything imports them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from s3servers import MotoS3Server, SeaweedS3Server  # noqa: E402


@pytest.fixture(scope="session")
def _moto_server():
    server = MotoS3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def moto_s3(_moto_server):
    _moto_server.reset()
    return _moto_server


@pytest.fixture(scope="session")
def _seaweed_server(tmp_path_factory):
    server = SeaweedS3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def seaweed_s3(_seaweed_server):
    _seaweed_server.start()  # no-op when running; brings it back if a previous test stopped it
    return _seaweed_server
