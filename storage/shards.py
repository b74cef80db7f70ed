"""WebDataset tar shards on any fsspec URL.

A shard is built in a local temp file and committed in one step (local rename or one S3 upload), so a
reader never sees half a shard. Tars are reproducible: fixed mtime, owner and mode, members sorted within a
sample, and our own canonical encoding of ``cls``/``json`` so identical samples give byte-identical shards.

Sample dicts: ``{"__key__": str, "jpg"|"png": bytes, "cls": int, "json": dict}`` (any extra extension with a
bytes/str/int/dict value is stored too). Keys must not contain dots (WebDataset splits member names at the
first dot) or slashes.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from typing import Any, Iterable, Iterator

from storage import fs

SHARD_MTIME = 0  # 1970-01-01: a constant so equal inputs give byte-equal tars
SHARD_OWNER = "sfd"
SHARD_MODE = 0o444
FSSPEC_GOPEN_PROTOCOLS = ("s3", "s3a", "memory")

# WebDataset's own rule (tariterators.base_plus_ext): the key is the name up to the first dot of the basename.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_VALID_KEY = re.compile(r"^[^./][^./]*$")


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    return fs.open(url, mode)


def register_fsspec_gopen() -> None:
    """Let ``webdataset`` open ``s3://`` and ``memory://`` URLs through fsspec with our storage options
    (webdataset 1.0.2 has no handler for them). Idempotent."""
    import webdataset as wds

    for proto in FSSPEC_GOPEN_PROTOCOLS:
        wds.gopen_schemes[proto] = _fsspec_gopen


def _encode_value(ext: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, bool):
        raise TypeError(f"field {ext!r}: booleans are ambiguous in a shard; store an int or JSON")
    if isinstance(value, int):  # cls/index: ASCII decimal, as WebDataset's default encoder writes it
        return str(value).encode("ascii")
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raise TypeError(f"field {ext!r}: cannot store a {type(value).__name__}; pass encoded bytes")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = SHARD_MTIME
    info.mode = SHARD_MODE
    info.uname = info.gname = SHARD_OWNER
    info.uid = info.gid = 0
    tar.addfile(info, io.BytesIO(data))


def _write_tar(local_path: str, samples: Iterable[dict[str, Any]]) -> int:
    count = 0
    seen_keys: set[str] = set()
    with tarfile.open(local_path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample.get("__key__")
            if not isinstance(key, str) or not _VALID_KEY.match(key):
                raise ValueError(f"sample key {key!r} must be a non-empty string without '.' or '/'")
            if key in seen_keys:
                raise ValueError(f"duplicate sample key {key!r} in one shard")
            seen_keys.add(key)
            fields = {ext: v for ext, v in sample.items() if not ext.startswith("_")}
            if not fields:
                raise ValueError(f"sample {key!r} has no fields")
            for ext in sorted(fields):
                _add_member(tar, f"{key}.{ext}", _encode_value(ext, fields[ext]))
            count += 1
    return count


def write_shard(url: str, samples: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Write ``samples`` as one tar at ``url`` and commit it atomically.
    Returns ``{"count": samples written, "bytes": tar size}`` (record both in the stage manifest: a
    truncated tar reads back silently shorter)."""
    if fs.is_local(url):
        # Build next to the destination so the commit is a same-filesystem rename.
        _, path = fs.filesystem(url)
        directory = os.path.dirname(os.path.abspath(path))
    else:
        directory = None
    if directory:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-shard-", suffix=".tar", dir=directory)
    os.close(fd)
    try:
        count = _write_tar(tmp, samples)
        size = os.path.getsize(tmp)
        if directory:
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"count": count, "bytes": size}


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of a shard in order: ``{"__key__": key, ext: raw bytes, ...}`` (no decoding)."""
    with fs.open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            if not member.isfile():
                continue
            match = _MEMBER_NAME.match(member.name)
            if not match:
                raise ValueError(f"{url}: member {member.name!r} has no extension")
            key, ext = match.group(1), match.group(2)
            data = tar.extractfile(member).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = data
        if current is not None:
            yield current


def count_shard(url: str) -> int:
    return sum(1 for _ in iter_shard(url))
