"""storage.arrays: Zarr v3 layout, chunk-aligned writers, bfloat16 handling, local vs S3."""
from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from storage import arrays, fs

ROWS, SHAPE, CHUNK = 10, (3, 2, 2), 4


def _data(dtype="float16") -> np.ndarray:
    return np.random.default_rng(0).standard_normal((ROWS, *SHAPE)).astype(dtype)


def _build(root: str, data: np.ndarray, compression="zstd") -> str:
    group_url = fs.join(root, "features.zarr")
    arrays.create_group(group_url, attributes={"encoder": "stand-in"})
    arr = arrays.create_array(fs.join(group_url, "texture"), (ROWS, *SHAPE), data.dtype, CHUNK,
                              attributes={"stats": [1.5, 2]}, compression=compression,
                              dimension_names=("n", "c", "h", "w"))
    for start, stop in arrays.chunk_ranges(arr):
        assert arrays.write_rows(arr, start, data[start:stop]) == stop
    labels = arrays.create_array(fs.join(group_url, "labels"), (ROWS,), "int64", CHUNK)
    arrays.write_rows(labels, 0, np.arange(ROWS))
    arrays.consolidate(group_url)
    return group_url


def _check(group_url: str, data: np.ndarray) -> None:
    arr = arrays.open_array(fs.join(group_url, "texture"))
    assert arr.shape == (ROWS, *SHAPE) and arr.chunks == (CHUNK, *SHAPE) and arr.dtype == data.dtype
    assert arr.attrs["stats"] == [1.5, 2]
    np.testing.assert_array_equal(arr[:], data)
    np.testing.assert_array_equal(arrays.read_rows(arr, 3, 9), data[3:9])
    group = arrays.open_group(group_url, use_consolidated=True)
    assert sorted(group.array_keys()) == ["labels", "texture"] and group.attrs["encoder"] == "stand-in"
    np.testing.assert_array_equal(group["labels"][:], np.arange(ROWS))


@pytest.mark.parametrize("compression", ["zstd", None])
def test_round_trip_local_and_memory(tmp_path, compression):
    data = _data()
    for root in (str(tmp_path / "local"), "file://" + str(tmp_path / "file-url"), f"memory://arr-{compression}"):
        _check(_build(root, data, compression), data)
    codecs = arrays.open_array(fs.join(str(tmp_path / "local"), "features.zarr", "texture")).compressors
    assert [type(c).__name__ for c in codecs] == (["ZstdCodec"] if compression else [])


def test_unaligned_writes_are_refused(tmp_path):
    arr = arrays.create_array(str(tmp_path / "a.zarr"), (ROWS, 2), "float32", CHUNK)
    for start, count in ((1, 4), (0, 3), (4, 5), (8, 4)):
        with pytest.raises(ValueError, match="not aligned"):
            arrays.write_rows(arr, start, np.zeros((count, 2), "float32"))
    assert arrays.write_rows(arr, 8, np.ones((2, 2), "float32")) == ROWS  # short last chunk is fine
    assert arrays.chunk_ranges(arr) == [(0, 4), (4, 8), (8, 10)]


def test_existing_array_needs_overwrite(tmp_path):
    url = str(tmp_path / "a.zarr")
    arrays.create_array(url, (ROWS,), "float32", CHUNK)
    with pytest.raises(Exception, match="exist"):
        arrays.create_array(url, (ROWS,), "float32", CHUNK)
    assert arrays.create_array(url, (2 * ROWS,), "float32", CHUNK, overwrite=True).shape == (2 * ROWS,)


def test_bfloat16_is_refused_and_bits_round_trip_exactly(tmp_path):
    import torch

    for dtype in ("bfloat16", torch.bfloat16):
        with pytest.raises(TypeError, match="bfloat16"):
            arrays.create_array(str(tmp_path / "bf.zarr"), (ROWS,), dtype, CHUNK)
    values = torch.randn(ROWS, 5, dtype=torch.float64).to(torch.bfloat16)
    bits = arrays.bfloat16_to_bits(values)
    assert bits.dtype == np.int16
    arr = arrays.create_array(str(tmp_path / "bits.zarr"), bits.shape, bits.dtype, CHUNK,
                              attributes={arrays.BF16_BITS_ATTRIBUTE: True})
    arrays.write_rows(arr, 0, bits)
    back = arrays.bits_to_bfloat16(arrays.open_array(str(tmp_path / "bits.zarr"))[:])
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.to(torch.float64), values.to(torch.float64))


def _write_chunk(url: str, start: int, stop: int) -> None:
    arr = arrays.open_array(url, mode="r+")
    arrays.write_rows(arr, start, _data()[start:stop])


def test_parallel_writers_by_chunk_on_s3(moto_s3, monkeypatch):
    """Forked writers (as DataLoader workers / multiprocessing pools are) each own whole chunks."""
    moto_s3.apply_env(monkeypatch)
    url = fs.join(moto_s3.fresh_url(), "par.zarr")
    arr = arrays.create_array(url, (ROWS, *SHAPE), "float16", CHUNK)
    ctx = multiprocessing.get_context("fork")  # after the parent used zarr + s3fs: must still work
    writers = [ctx.Process(target=_write_chunk, args=(url, start, stop)) for start, stop in arrays.chunk_ranges(arr)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    np.testing.assert_array_equal(arrays.open_array(url)[:], _data())


@pytest.mark.s3
def test_s3_arrays_match_local(seaweed_s3, monkeypatch, tmp_path):
    seaweed_s3.apply_env(monkeypatch)
    data = _data("float32")
    local = _build(str(tmp_path), data)
    remote = _build(seaweed_s3.fresh_url("zarr"), data)
    _check(remote, data)
    for name in ("texture", "labels"):
        np.testing.assert_array_equal(arrays.open_array(fs.join(remote, name))[:],
                                      arrays.open_array(fs.join(local, name))[:])
    # the stored objects are the same bytes too (same codecs, same chunk keys)
    for chunk in ("texture/c/0/0/0/0", "texture/c/2/0/0/0", "labels/c/1", "texture/zarr.json"):
        assert fs.read_bytes(fs.join(remote, chunk)) == fs.read_bytes(fs.join(local, chunk)), chunk
