"""storage.shards: deterministic WebDataset tars, atomic commit, identical bytes locally and on S3."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from storage import fs
from storage.shards import count_shard, iter_shard, register_fsspec_gopen, write_shard


def _samples(n: int, offset: int = 0) -> list[dict]:
    return [{"__key__": f"n0144_{i:05d}", "jpg": bytes([i % 256]) * (100 + i), "cls": i % 7,
             "json": {"wnid": "n01440764", "index": i}} for i in range(offset, offset + n)]


def _expected_raw(sample: dict) -> dict:
    return {"__key__": sample["__key__"], "jpg": sample["jpg"], "cls": str(sample["cls"]).encode(),
            "json": json.dumps(sample["json"], sort_keys=True, separators=(",", ":")).encode()}


def test_write_and_read_back_local(tmp_path):
    url = str(tmp_path / "shards" / "shard-000000.tar")
    info = write_shard(url, iter(_samples(6)))  # any iterable, consumed once
    assert info == {"count": 6, "bytes": (tmp_path / "shards" / "shard-000000.tar").stat().st_size}
    assert list(iter_shard(url)) == [_expected_raw(s) for s in _samples(6)]
    assert count_shard(url) == 6
    with tarfile.open(url) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["n0144_00000.cls", "n0144_00000.jpg", "n0144_00000.json"]
    assert {(m.mtime, m.uname, m.gname, m.mode) for m in members} == {(0, "sfd", "sfd", 0o444)}
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["shard-000000.tar"]  # no temp left


def test_identical_inputs_give_identical_bytes(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a.tar", "b.tar", "c.tar"))
    write_shard(a, _samples(5))
    reordered_json = [{**s, "json": dict(reversed(list(s["json"].items())))} for s in _samples(5)]
    write_shard(b, reordered_json)
    assert fs.read_bytes(a) == fs.read_bytes(b)
    write_shard(c, _samples(5, offset=1))
    assert fs.read_bytes(a) != fs.read_bytes(c)


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    register_fsspec_gopen()
    local = str(tmp_path / "s.tar")
    write_shard(local, _samples(4))
    write_shard("memory://wds-test/s.tar", _samples(4))
    for url in (local, "memory://wds-test/s.tar"):
        rows = [(s["__key__"], s["cls"], s["json"]["index"], s["jpg"])
                for s in wds.WebDataset(url, shardshuffle=False).decode()]
        assert rows == [(s["__key__"], s["cls"], s["json"]["index"], s["jpg"]) for s in _samples(4)]


@pytest.mark.parametrize("bad, message", [
    ([{"__key__": "a.b", "cls": 1}], "without '.'"),
    ([{"__key__": "a", "cls": 1}, {"__key__": "a", "cls": 2}], "duplicate"),
    ([{"__key__": "a", "cls": True}], "booleans"),
    ([{"__key__": "a", "npy": object()}], "cannot store"),
    ([{"__key__": "a"}], "no fields"),
])
def test_invalid_samples_fail_and_commit_nothing(tmp_path, bad, message):
    url = str(tmp_path / "bad.tar")
    with pytest.raises((ValueError, TypeError), match=message):
        write_shard(url, _samples(2) + bad)
    assert list(tmp_path.iterdir()) == []


def test_failing_producer_commits_nothing(tmp_path):
    def producer():
        yield from _samples(3)
        raise RuntimeError("decoder crashed")

    url = str(tmp_path / "s.tar")
    write_shard(url, _samples(1))
    with pytest.raises(RuntimeError, match="decoder crashed"):
        write_shard(url, producer())
    assert count_shard(url) == 1  # the earlier shard is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["s.tar"]


@pytest.mark.s3
def test_s3_shards_match_local_bytes(seaweed_s3, monkeypatch, tmp_path):
    import webdataset as wds

    seaweed_s3.apply_env(monkeypatch)
    register_fsspec_gopen()
    local = str(tmp_path / "s.tar")
    remote = fs.join(seaweed_s3.fresh_url("shards"), "shard-000000.tar")
    samples = _samples(20)
    assert write_shard(remote, samples) == write_shard(local, samples)
    assert fs.read_bytes(remote) == fs.read_bytes(local)
    body = seaweed_s3.client().get_object(Bucket=seaweed_s3.bucket, Key=remote.split("/", 3)[3])["Body"].read()
    assert body == fs.read_bytes(local)  # what the server holds, read without our code
    assert list(iter_shard(remote)) == [_expected_raw(s) for s in samples]
    assert [s["__key__"] for s in wds.WebDataset(remote, shardshuffle=False)] == [s["__key__"] for s in samples]
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert len(tar.getmembers()) == 60
