"""storage.manifest and storage.parts: round trips on local disk and on S3 (moto)."""
from __future__ import annotations

import datetime as dt

import pytest

from storage import fs
from storage.manifest import SUCCESS, is_complete, read_success, write_success
from storage.parts import PartMarkers


def _manifest_round_trip(out_url: str) -> None:
    assert read_success(out_url) is None and not is_complete(out_url)
    manifest = {"stage": "imagenet_shards", "fingerprint": "0123456789abcdef", "uri": out_url,
                "counts": {"images": 12}, "stats": {}, "metrics": {"x": 0.5},
                "artifacts": {"shards": fs.join(out_url, "shards")}, "config": {"res": 64},
                "upstream": {}, "code_version": "1", "standins": True}
    written = write_success(out_url, manifest)
    assert "created" not in manifest  # the caller's dict is left alone
    created = dt.datetime.fromisoformat(written["created"])
    assert created.tzinfo is not None and abs(dt.datetime.now(dt.timezone.utc) - created).total_seconds() < 60
    assert read_success(out_url) == written == {**manifest, "created": written["created"]}
    assert is_complete(out_url)
    assert fs.ls(out_url) == [fs.join(out_url, SUCCESS)]
    kept = write_success(out_url, {**manifest, "created": "2020-01-01T00:00:00+00:00"})
    assert read_success(out_url)["created"] == kept["created"] == "2020-01-01T00:00:00+00:00"


def _parts_round_trip(out_url: str) -> None:
    parts = PartMarkers(out_url)
    assert parts.all() == {} and not parts.done("shard-000000") and parts.get("shard-000000") is None
    parts.mark("shard-000000", {"count": 5, "bytes": 10240})
    parts.mark("shard-000001", {"count": 3})
    parts.mark("chunk-2")
    assert parts.done("shard-000000") and not parts.done("shard-000002")
    assert parts.get("shard-000001") == {"count": 3}
    assert parts.all() == {"shard-000000": {"count": 5, "bytes": 10240}, "shard-000001": {"count": 3},
                           "chunk-2": {}}
    assert fs.exists(fs.join(out_url, "_parts", "shard-000000.json"))
    parts.mark("shard-000001", {"count": 4})  # re-marking replaces
    assert PartMarkers(out_url).get("shard-000001") == {"count": 4}
    for bad in ("", "a/b", "../x", "x.json", ".hidden"):
        with pytest.raises(ValueError, match="part name"):
            parts.mark(bad, {})


def test_manifest_and_parts_local(tmp_path):
    out = str(tmp_path / "stage" / "0123456789abcdef")
    _parts_round_trip(out)
    _manifest_round_trip(str(tmp_path / "other"))


def test_parts_ignore_in_flight_temp_files(tmp_path):
    out = str(tmp_path / "stage")
    PartMarkers(out).mark("a", {"n": 1})
    (tmp_path / "stage" / "_parts" / ".tmp-b.json-xyz").write_text("{partial")
    assert PartMarkers(out).all() == {"a": {"n": 1}}


def test_manifest_and_parts_s3(moto_s3, monkeypatch):
    moto_s3.apply_env(monkeypatch)
    _parts_round_trip(moto_s3.fresh_url("parts"))
    _manifest_round_trip(moto_s3.fresh_url("manifest"))
