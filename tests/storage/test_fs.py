"""storage.fs: URLs, options from the environment, round trips, retries, atomic writes."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from storage import fs

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------- URLs

@pytest.mark.parametrize("root, parts, expected", [
    ("artifacts", ("a", "b"), "artifacts/a/b"),
    ("/abs/dir/", ("a/", "/b"), "/abs/dir/a/b"),
    ("s3://bkt/pfx", ("a", "b.json"), "s3://bkt/pfx/a/b.json"),
    ("s3://bkt/pfx/", ("/a/",), "s3://bkt/pfx/a"),
    ("s3://bkt", ("stage", "0123"), "s3://bkt/stage/0123"),
    ("memory://", ("x", "y"), "memory://x/y"),
    ("file:///tmp/r", ("a",), "file:///tmp/r/a"),
    ("s3://bkt/pfx", (), "s3://bkt/pfx"),
])
def test_join(root, parts, expected):
    assert fs.join(root, *parts) == expected


def test_protocol_and_locality():
    assert fs.protocol("artifacts/x") == "file" and fs.is_local("artifacts/x")
    assert fs.protocol("file:///tmp/x") == "file" and fs.is_local("file:///tmp/x")
    assert fs.protocol("s3://b/k") == "s3" and not fs.is_local("s3://b/k")
    assert fs.protocol("memory://k") == "memory"


# ------------------------------------------------------------------------------------------ options

def test_storage_options_from_environment(monkeypatch):
    for var in ("SFD_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "SFD_STORAGE_OPTIONS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-endpoint:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kid")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sec")
    opts = fs.storage_options("s3://b/k")
    assert opts["client_kwargs"] == {"endpoint_url": "http://aws-endpoint:1"}
    assert (opts["key"], opts["secret"]) == ("kid", "sec")
    assert opts["use_listings_cache"] is False
    assert fs.storage_options("artifacts/x") == {} and fs.storage_options("file:///x") == {}

    monkeypatch.setenv("SFD_S3_ENDPOINT_URL", "http://sfd-endpoint:2")  # ours wins over AWS_ENDPOINT_URL
    monkeypatch.setenv("SFD_STORAGE_OPTIONS", json.dumps({"client_kwargs": {"region_name": "eu-1"}, "anon": False}))
    opts = fs.storage_options("s3://b/k")
    assert opts["client_kwargs"] == {"endpoint_url": "http://sfd-endpoint:2", "region_name": "eu-1"}
    assert opts["anon"] is False and opts["key"] == "kid"

    monkeypatch.setenv("SFD_STORAGE_OPTIONS", "[1, 2]")
    with pytest.raises(ValueError, match="SFD_STORAGE_OPTIONS"):
        fs.storage_options("s3://b/k")


def test_filesystem_cache_reuses_instances_per_options(monkeypatch):
    monkeypatch.delenv("SFD_STORAGE_OPTIONS", raising=False)
    monkeypatch.setenv("SFD_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    first, path = fs.filesystem("s3://bkt/a/b")
    again, _ = fs.filesystem("s3://bkt/other")
    assert path == "bkt/a/b" and first is again
    monkeypatch.setenv("SFD_S3_ENDPOINT_URL", "http://127.0.0.1:2")
    assert fs.filesystem("s3://bkt/a")[0] is not first  # new options, new client


# ------------------------------------------------------------------------------------- round trips

def _round_trip(root: str, tmp_path: Path) -> None:
    url = fs.join(root, "dir", "obj.bin")
    assert not fs.exists(url)
    fs.write_bytes(url, b"\x00payload\xff")
    assert fs.exists(url) and fs.read_bytes(url) == b"\x00payload\xff"
    fs.write_bytes(url, b"second")  # overwrite replaces whole
    assert fs.read_bytes(url) == b"second"

    fs.write_json(fs.join(root, "dir", "m.json"), {"b": [1, 2.5], "a": "x"})
    assert fs.read_json(fs.join(root, "dir", "m.json")) == {"a": "x", "b": [1, 2.5]}

    local = tmp_path / "up.bin"
    local.write_bytes(os.urandom(300_000))
    fs.put_file(str(local), fs.join(root, "dir", "sub", "up.bin"))
    fs.get_file(fs.join(root, "dir", "sub", "up.bin"), str(tmp_path / "down" / "up.bin"))
    assert (tmp_path / "down" / "up.bin").read_bytes() == local.read_bytes()

    with fs.open(fs.join(root, "dir", "obj.bin")) as f:
        assert f.read(3) == b"sec"

    assert fs.ls(fs.join(root, "dir")) == [fs.join(root, "dir", n) for n in ("m.json", "obj.bin", "sub")]
    assert fs.ls(fs.join(root, "missing")) == []
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(fs.join(root, "missing", "x"))
    fs.rm(fs.join(root, "dir", "obj.bin"))
    fs.rm(fs.join(root, "dir", "obj.bin"))  # already gone: fine
    assert not fs.exists(fs.join(root, "dir", "obj.bin"))
    fs.rm(fs.join(root, "dir"), recursive=True)
    assert fs.ls(root) == []


def test_round_trip_local(tmp_path):
    _round_trip(str(tmp_path / "root"), tmp_path)
    assert not [p for p in (tmp_path / "down").iterdir() if p.name.startswith(".tmp-")]


def test_round_trip_file_url_and_memory(tmp_path):
    _round_trip("file://" + str(tmp_path / "root"), tmp_path)
    _round_trip("memory://rt-test", tmp_path)


def test_round_trip_s3_moto(moto_s3, monkeypatch, tmp_path):
    moto_s3.apply_env(monkeypatch)
    root = moto_s3.fresh_url()
    _round_trip(root, tmp_path)


def test_s3_listings_are_not_cached(moto_s3, monkeypatch):
    """Another process writes to the prefix after we listed it: we must see the new object."""
    moto_s3.apply_env(monkeypatch)
    root = moto_s3.fresh_url()
    fs.write_bytes(fs.join(root, "a"), b"1")
    assert fs.ls(root) == [fs.join(root, "a")]
    key = root.split("/", 3)[3] + "/b"
    moto_s3.client().put_object(Bucket=moto_s3.bucket, Key=key, Body=b"2")
    assert fs.ls(root) == [fs.join(root, "a"), fs.join(root, "b")]
    assert fs.exists(fs.join(root, "b"))


def _read_in_child(url, queue):
    queue.put(fs.read_bytes(url))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_filesystem_survives_fork_and_spawn(moto_s3, monkeypatch, start_method):
    moto_s3.apply_env(monkeypatch)
    url = fs.join(moto_s3.fresh_url(), "x.bin")
    fs.write_bytes(url, b"from parent")  # the parent has a live cached client before the child starts
    ctx = multiprocessing.get_context(start_method)
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(url, queue))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == b"from parent"
    assert fs.read_bytes(url) == b"from parent"  # and the parent's client still works


# ----------------------------------------------------------------------------------------- retries

class _Flaky:
    def __init__(self, errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self, value):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return value


def test_retrying_recovers_from_transient_errors():
    flaky = _Flaky([ConnectionRefusedError(111, "Connection refused"), TimeoutError("read timed out"),
                    OSError(5, "An error occurred (SlowDown) when calling the PutObject operation")])
    assert fs.retrying(flaky, "ok", attempts=5, base_delay=0.001) == "ok"
    assert flaky.calls == 4


@pytest.mark.parametrize("error", [FileNotFoundError("nope"), PermissionError("Forbidden"),
                                   ValueError("bad"), OSError(22, "InvalidArgument")])
def test_retrying_fails_fast_on_permanent_errors(error):
    flaky = _Flaky([error])
    with pytest.raises(type(error)):
        fs.retrying(flaky, "ok", attempts=5, base_delay=10.0)  # a retry would sleep for seconds
    assert flaky.calls == 1


def test_retrying_gives_up_after_attempts():
    flaky = _Flaky([ConnectionResetError(104, "reset")] * 10)
    with pytest.raises(ConnectionResetError):
        fs.retrying(flaky, "ok", attempts=3, base_delay=0.001)
    assert flaky.calls == 3


def test_is_transient_classifies_botocore_errors():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert fs.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert fs.is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert fs.is_transient(client_error("ServiceUnavailable", 503))
    assert fs.is_transient(client_error("WeirdInternal", 500))
    assert not fs.is_transient(client_error("NoSuchKey", 404))
    assert not fs.is_transient(client_error("AccessDenied", 403))
    wrapped = OSError(5, "io")  # what s3fs raises, with the botocore error as cause
    wrapped.__cause__ = client_error("SlowDown", 503)
    assert fs.is_transient(wrapped)
    missing = FileNotFoundError("k")
    missing.__cause__ = client_error("NoSuchKey", 404)
    assert not fs.is_transient(missing)


# ---------------------------------------------------------------------------------- atomic writes

def _start_writer(script: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_writer_never_exposes_a_partial_file(tmp_path):
    """SIGKILL a writer after its data hit the disk but before the commit: readers still see the old file."""
    target = tmp_path / "out" / "obj.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    writer = _start_writer(f"""
        import os, sys, time
        from storage import fs
        real_fsync = os.fsync
        def fsync_then_hang(fd):  # the temp file is complete and durable; the commit would come next
            real_fsync(fd)
            print("DATA-WRITTEN", flush=True)
            time.sleep(60)
        os.fsync = fsync_then_hang
        fs.write_bytes({str(target)!r}, b"new" * 1_000_000)
    """)
    assert writer.stdout.readline().strip() == "DATA-WRITTEN", writer.stderr.read()
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(10)
    assert target.read_bytes() == b"old"
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "obj.bin"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-obj.bin-")  # invisible to part listings
    assert (target.parent / leftovers[0]).stat().st_size == 3_000_000


def test_writer_killed_at_a_random_moment_leaves_old_or_new_content(tmp_path):
    target = tmp_path / "obj.bin"
    versions = [bytes([i]) * 2_000_000 for i in range(2)]
    fs.write_bytes(str(target), versions[0])
    writer = _start_writer(f"""
        from storage import fs
        versions = [bytes([i]) * 2_000_000 for i in range(2)]
        for i in range(100_000):
            fs.write_bytes({str(target)!r}, versions[(i + 1) % 2])
            if i == 0:
                print("STARTED", flush=True)  # at least one full replacement happened
    """)
    assert writer.stdout.readline().strip() == "STARTED", writer.stderr.read()
    time.sleep(0.4)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(10)
    assert target.read_bytes() in versions
