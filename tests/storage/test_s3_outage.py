"""Against a real S3 server (SeaweedFS): outages are ridden out by retries, bad credentials fail fast."""
from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time

import numpy as np
import pytest

from storage import arrays, fs
from storage.shards import count_shard, write_shard

pytestmark = pytest.mark.s3

OUTAGE_S = 1.0  # well inside the retry window (~25-45 s of backoff with the default 10 attempts)


def _run_during_outage(server, work) -> None:
    """Stop the server, start ``work`` in a thread, restart the server after OUTAGE_S; ``work`` must finish."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = work()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = error

    server.stop()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    time.sleep(OUTAGE_S)
    assert thread.is_alive(), f"finished while the server was down: {outcome}"  # so it really had to retry
    server.start()
    thread.join(60)
    assert not thread.is_alive(), "still retrying 60 s after the server came back"
    if "error" in outcome:
        raise outcome["error"]


def test_single_put_completes_across_a_server_restart(seaweed_s3, monkeypatch):
    seaweed_s3.apply_env(monkeypatch)
    root = seaweed_s3.fresh_url("outage")
    fs.write_bytes(fs.join(root, "before.bin"), b"before")  # its pooled connection goes stale in the outage
    _run_during_outage(seaweed_s3, lambda: fs.write_json(fs.join(root, "during.json"), {"n": 5}))
    assert fs.read_json(fs.join(root, "during.json")) == {"n": 5}
    assert fs.read_bytes(fs.join(root, "before.bin")) == b"before"  # data survives a SIGKILL + restart


def test_shard_upload_completes_across_a_server_restart(seaweed_s3, monkeypatch):
    seaweed_s3.apply_env(monkeypatch)
    url = fs.join(seaweed_s3.fresh_url("outage-shard"), "s.tar")
    samples = [{"__key__": f"k{i}", "cls": i, "png": b"p" * 50} for i in range(5)]
    _run_during_outage(seaweed_s3, lambda: write_shard(url, samples))
    assert count_shard(url) == 5


def test_zarr_chunk_write_completes_across_a_server_restart(seaweed_s3, monkeypatch):
    seaweed_s3.apply_env(monkeypatch)
    url = fs.join(seaweed_s3.fresh_url("outage-zarr"), "a.zarr")
    arr = arrays.create_array(url, (8, 3), "float32", 4)
    data = np.arange(24, dtype="float32").reshape(8, 3)
    arrays.write_rows(arr, 0, data[:4])
    _run_during_outage(seaweed_s3, lambda: arrays.write_rows(arr, 4, data[4:]))
    np.testing.assert_array_equal(arrays.open_array(url)[:], data)


def test_wrong_credentials_fail_fast_with_a_clear_message(seaweed_s3, monkeypatch):
    seaweed_s3.apply_env(monkeypatch)
    url = fs.join(seaweed_s3.fresh_url("auth"), "x.json")
    fs.write_json(url, {"ok": True})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for action in (lambda: fs.read_json(url), lambda: fs.write_bytes(url, b"x"), lambda: fs.exists(url)):
        started = time.monotonic()
        with pytest.raises(PermissionError) as caught:
            action()
        assert time.monotonic() - started < 5  # no backoff on a permanent error
        message = str(caught.value)
        assert "access denied" in message and url in message and seaweed_s3.endpoint_url in message
        assert seaweed_s3.access_key in message and "AWS_SECRET_ACCESS_KEY" in message
        assert "not-the-secret" not in message
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
    assert fs.read_json(url) == {"ok": True}


def _work_in_child(parent_url: str, env: dict, queue) -> None:
    # Same endpoint as the parent: must not reuse the parent's clients (their loop does not run here).
    assert fs.read_bytes(parent_url) == b"x"
    # New clients against another endpoint: inherited ones may be dropped while the child's loop runs.
    os.environ.update(env)
    url = fs.join(env["CHILD_ROOT"], "child.zarr")
    arrays.write_rows(arrays.create_array(url, (2, 2), "float32", 2), 0, np.full((2, 2), 3, "float32"))
    fs.write_bytes(fs.join(env["CHILD_ROOT"], "c.bin"), b"c")
    gc.collect()
    queue.put(float(arrays.open_array(url)[0, 0]) + len(fs.read_bytes(fs.join(env["CHILD_ROOT"], "c.bin"))))


def test_forked_child_leaves_the_parents_keepalive_connections_working(seaweed_s3, moto_s3, monkeypatch):
    """A forked worker (DataLoader, Pool) must not break the parent's pooled connections: s3fs finalizers
    in the child would unregister the parent's sockets from the epoll instance they share."""
    seaweed_s3.apply_env(monkeypatch)
    root = seaweed_s3.fresh_url("fork")
    fs.write_bytes(fs.join(root, "x.bin"), b"x")  # the parent now holds pooled keep-alive connections
    url = fs.join(root, "a.zarr")
    arr = arrays.create_array(url, (4, 2), "float32", 2)
    arrays.write_rows(arr, 0, np.ones((4, 2), "float32"))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_work_in_child, args=(fs.join(root, "x.bin"),
                                                     {**moto_s3.env(), "CHILD_ROOT": moto_s3.fresh_url("child")},
                                                     queue))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and queue.get(timeout=5) == 4.0

    outcome = {}
    reader = threading.Thread(target=lambda: outcome.update(
        bytes=fs.read_bytes(fs.join(root, "x.bin")), rows=arrays.read_rows(arr, 0, 4)), daemon=True)
    reader.start()
    reader.join(10)  # a broken pool hangs (forever or until a long timeout) rather than failing
    assert not reader.is_alive(), "the parent's request hung after the forked child exited"
    assert outcome["bytes"] == b"x"
    np.testing.assert_array_equal(outcome["rows"], np.ones((4, 2), "float32"))
