"""Zarr v3 arrays (zarr-python 3.1.x) on local paths or fsspec URLs.

Layout rules (see shared DATA-NOTES §3):
- Arrays are ``[N, ...]`` and chunked along the sample axis only; no sharding codec, so processes that each
  write whole chunks never touch the same object and may write in parallel (``write_rows`` checks alignment).
- Compression is zstd level 1 (latents and features barely compress; level 1 is cheap) or none.
- Zarr has no bfloat16. Store float16, or the raw bf16 bits as int16 (``bfloat16_to_bits`` /
  ``bits_to_bfloat16``) and say so in the array's attributes.
- zarr treats a string with ``://`` as an fsspec URL (given ``storage_options``) and a plain path as a
  ``LocalStore``; passing ``storage_options`` with a plain path is a TypeError. ``_location`` hands zarr a
  plain path for local URLs (``file://`` included: fsspec's local store would not create directories) and
  the URL plus our storage options otherwise.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage import fs

ZSTD_LEVEL = 1
COMPRESSIONS = ("zstd", None)
BF16_BITS_ATTRIBUTE = "bfloat16_bits"  # attribute to set (True) on an int16 array that holds bf16 bits


def _location(url: str) -> dict[str, Any]:
    """Keyword arguments naming ``url`` for zarr's ``store=``/``storage_options=``."""
    if fs.is_local(url):
        return {"store": fs.filesystem(url)[1], "storage_options": None}
    return {"store": url, "storage_options": fs.storage_options(url)}


def _numpy_dtype(dtype: Any) -> np.dtype:
    """numpy dtype from a numpy/str/torch dtype; bfloat16 is refused with the ways around it."""
    name = str(dtype).removeprefix("torch.")
    if "bfloat16" in name:
        raise TypeError("zarr cannot store bfloat16: store float16, or int16 bits via "
                        f"storage.arrays.bfloat16_to_bits() with attributes={{'{BF16_BITS_ATTRIBUTE}': True}}")
    return np.dtype(name)


def _chunk_shape(shape: Sequence[int], chunks: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(chunks, int):
        return (max(1, chunks), *[max(1, s) for s in shape[1:]])
    chunk_shape = tuple(int(c) for c in chunks)
    if len(chunk_shape) != len(shape):
        raise ValueError(f"chunks {chunk_shape} must have one entry per dimension of shape {tuple(shape)}")
    return chunk_shape


def create_array(url: str, shape: Sequence[int], dtype: Any, chunks: int | Sequence[int],
                 attributes: dict[str, Any] | None = None, overwrite: bool = False,
                 compression: str | None = "zstd", dimension_names: Sequence[str] | None = None,
                 fill_value: Any = 0) -> zarr.Array:
    """Create an array at ``url``. ``chunks`` is the number of samples per chunk (axis 0; the other axes are
    whole) or a full chunk shape. Parallel writers: create once, then each ``open_array(url, "r+")``."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    compressors = [ZstdCodec(level=ZSTD_LEVEL)] if compression == "zstd" else None
    return fs.retrying(
        zarr.create_array, **_location(url), shape=tuple(int(s) for s in shape),
        dtype=_numpy_dtype(dtype), chunks=_chunk_shape(shape, chunks), shards=None, compressors=compressors,
        fill_value=fill_value, attributes=attributes or {}, overwrite=overwrite,
        dimension_names=tuple(dimension_names) if dimension_names else None)


def open_array(url: str, mode: str = "r") -> zarr.Array:
    return fs.retrying(zarr.open_array, **_location(url), mode=mode)


def create_group(url: str, attributes: dict[str, Any] | None = None, overwrite: bool = False) -> zarr.Group:
    """A group (e.g. ``features.zarr``) to hold arrays created at ``fs.join(url, name)``."""
    mode = "w" if overwrite else "a"
    group = fs.retrying(zarr.open_group, **_location(url), mode=mode)
    if attributes:
        group.attrs.update(attributes)
    return group


def open_group(url: str, mode: str = "r", use_consolidated: bool | None = None) -> zarr.Group:
    return fs.retrying(zarr.open_group, **_location(url), mode=mode,
                       use_consolidated=use_consolidated)


def consolidate(url: str) -> None:
    """Write consolidated metadata for the group at ``url`` (once, after every writer has finished)."""
    location = _location(url)
    store: Any = location["store"]
    if location["storage_options"] is not None:  # consolidate_metadata takes a store, not storage_options
        store = zarr.storage.FsspecStore.from_url(url, storage_options=location["storage_options"],
                                                  read_only=False)
    fs.retrying(zarr.consolidate_metadata, store)


def chunk_ranges(array: zarr.Array) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the chunks along axis 0: the units one writer owns."""
    rows, step = array.shape[0], array.chunks[0]
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def write_rows(array: zarr.Array, start: int, data: np.ndarray) -> int:
    """Write ``data`` into rows ``[start, start + len(data))``, which must cover whole chunks (the last
    chunk may be short at the end of the array), so concurrent writers never share a chunk. Returns the stop."""
    stop = start + len(data)
    step, rows = array.chunks[0], array.shape[0]
    if start % step or (stop % step and stop != rows) or stop > rows:
        raise ValueError(f"rows [{start}, {stop}) are not aligned to chunks of {step} rows "
                         f"(array has {rows} rows)")
    fs.retrying(array.__setitem__, slice(start, stop), data)
    return stop


def read_rows(array: zarr.Array, start: int, stop: int) -> np.ndarray:
    return fs.retrying(array.__getitem__, slice(start, stop))


def bfloat16_to_bits(tensor: Any) -> np.ndarray:
    """A torch bfloat16 tensor as an int16 numpy array holding the same bits."""
    import torch

    return tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy()


def bits_to_bfloat16(bits: np.ndarray) -> Any:
    """Inverse of ``bfloat16_to_bits``: int16 bits -> torch bfloat16 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.int16)).view(torch.bfloat16)
