"""Training data over Zarr sample arrays: chunk-then-buffer shuffling, streams, resumable positions.

Reading single samples from Zarr costs a chunk decode each, so every read here is of whole chunks:

1. Blocks: the sample axis is cut into blocks that are whole chunks of every array read (lcm of the chunk
   lengths). Each epoch the block order is shuffled with ``(seed, epoch)``.
2. Streams: the global batch is split into ``num_streams`` equal micro-batches; stream ``s`` owns the blocks
   ``order[s::num_streams]``. A rank serves ``num_streams / world_size`` consecutive streams, so each block is
   read by exactly one rank, and because the stream count (not the world size) fixes who sees what, the data
   of every global step is the same on 1 or N processes.
3. Windows: a stream reads ``window_blocks`` blocks at a time, shuffles their samples together with a
   ``(seed, epoch, stream, window)`` generator (which also draws the per-sample image/flip choice, applied as
   each block is read, so a window keeps one variant per sample) and cuts micro-batches; samples left over at
   the end of a window are dropped. Every stream yields the same number of micro-batches per epoch (the
   minimum over streams), so ranks stay in lockstep.

Positions are ``(epoch, batches done in that epoch)``: resuming skips whole windows without reading them.
DataLoader workers take whole windows in turn (window i -> worker i mod workers) and the loader returns them
in order, so the batch sequence does not depend on the number of workers. Arrays are opened lazily in each
process (``worker_init``), never inherited through fork. A window crosses processes as compact tensors (one
variant per sample, stored dtypes); ``finalize_batch`` makes each micro-batch in the consumer.

A micro-batch mixes only the samples of one window. imagenet_shards writes rows in a seeded random order, so a
chunk already mixes classes; the window (4096 samples by default) still spans many chunks, which also keeps
sources stored in class order (shuffle off, or official caches) usable.
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage import fs
from storage.arrays import open_array, read_rows

# Stage output layouts this module reads (see docs/internals.md).
FEATURES_STORE = "features.zarr"   # texture_latents: texture, texture_flip, labels; dinov2_features: dino, dino_flip
LATENTS_STORE = "latents.zarr"     # semantic_latents: semantic, semantic_flip, labels
FLIP_SUFFIX = "_flip"


def array_url(stage_dir: str, store: str, name: str) -> str:
    return fs.join(stage_dir, store, name)


# ------------------------------------------------------------------------------------------------ stats

def channel_stats(array: Any, max_samples: int = 10_000, seed: int = 0, num_rows: int | None = None
                  ) -> dict[str, list[float]]:
    """Per-channel mean and unbiased std (float64) of ``array`` [N, C, ...] over up to ``max_samples`` rows.

    Rows are drawn at random (seeded) from a random subset of whole chunks holding about 4x the rows needed,
    which keeps the read small on large arrays; arrays of at most that size are sampled uniformly."""
    rows_total = int(num_rows if num_rows is not None else array.shape[0])
    chunk = int(array.chunks[0])
    rng = np.random.default_rng([seed, 7])
    n_chunks = math.ceil(rows_total / chunk)
    wanted_chunks = min(n_chunks, max(1, math.ceil(4 * max_samples / chunk)))
    chosen = np.sort(rng.choice(n_chunks, size=wanted_chunks, replace=False))
    candidates = np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, rows_total)) for c in chosen])
    picked = np.sort(rng.choice(candidates, size=min(max_samples, len(candidates)), replace=False))
    values = np.asarray(fs.retrying(array.get_orthogonal_selection, (picked,)), dtype=np.float64)
    axes = (0, *range(2, values.ndim))
    return {"mean": values.mean(axis=axes).tolist(), "std": values.std(axis=axes, ddof=1).tolist(),
            "samples": int(len(picked))}


def stats_arrays(stats: Mapping[str, Sequence[float]], ndim: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) as float32 arrays shaped [1, C, 1, ...] for broadcasting over [N, C, ...]."""
    shape = (1, -1) + (1,) * (ndim - 2)
    return (np.asarray(stats["mean"], dtype=np.float32).reshape(shape),
            np.asarray(stats["std"], dtype=np.float32).reshape(shape))


# ------------------------------------------------------------------------------------------------ order

def common_block_size(chunk_lengths: Sequence[int]) -> int:
    """Smallest row count made of whole chunks of every array."""
    return math.lcm(*[int(c) for c in chunk_lengths])


def streams_of_rank(num_streams: int, rank: int, world_size: int) -> range:
    if num_streams % world_size:
        raise ValueError(f"data streams ({num_streams}) must be a multiple of the world size ({world_size})")
    per_rank = num_streams // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


@dataclass(frozen=True)
class ShufflePlan:
    """The deterministic sample order of every stream in every epoch (see the module docstring)."""

    num_samples: int    # rows [0, num_samples) take part
    block_size: int     # rows per block (whole chunks)
    window_blocks: int  # blocks shuffled together
    num_streams: int
    batch_size: int     # samples per stream micro-batch
    seed: int

    def __post_init__(self) -> None:
        for name in ("num_samples", "block_size", "window_blocks", "num_streams", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ShufflePlan.{name} must be >= 1, got {getattr(self, name)}")
        if self.window_blocks * self.block_size < self.batch_size:
            raise ValueError(f"a shuffle window ({self.window_blocks} blocks x {self.block_size} rows) must hold "
                             f"at least one micro-batch of {self.batch_size}; raise the shuffle window")
        if self.steps_per_epoch(0) < 1:
            raise ValueError(f"{self.num_samples} samples give no full micro-batch of {self.batch_size} in each of "
                             f"{self.num_streams} streams; use fewer streams or a smaller batch")

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_samples / self.block_size)

    def block_rows(self, block: int) -> np.ndarray:
        start = block * self.block_size
        return np.arange(start, min(start + self.block_size, self.num_samples))

    def stream_windows(self, epoch: int, stream: int) -> list[np.ndarray]:
        """Block ids of each window of ``stream`` in ``epoch``."""
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(self.num_blocks)
        mine = order[stream::self.num_streams]
        return [mine[i:i + self.window_blocks] for i in range(0, len(mine), self.window_blocks)]

    def window_rows(self, blocks: np.ndarray) -> np.ndarray:
        """Sorted row indices of a window (whole blocks)."""
        return np.sort(np.concatenate([self.block_rows(int(b)) for b in blocks]))

    def window_batch_counts(self, epoch: int, stream: int) -> list[int]:
        sizes = np.full(self.num_blocks, self.block_size)
        sizes[-1] = self.num_samples - (self.num_blocks - 1) * self.block_size
        return [int(sizes[w].sum()) // self.batch_size for w in self.stream_windows(epoch, stream)]

    def steps_per_epoch(self, epoch: int) -> int:
        return _steps_per_epoch(self, epoch)

    def window_rng(self, epoch: int, stream: int, window: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, 1, stream, window])


@functools.lru_cache(maxsize=16)
def _steps_per_epoch(plan: ShufflePlan, epoch: int) -> int:
    # Cached: asked at every step, and it walks every window of every stream.
    return min(sum(plan.window_batch_counts(epoch, s)) for s in range(plan.num_streams))


# ---------------------------------------------------------------------------------------------- reading

def tokens_from_grid(features: np.ndarray) -> torch.Tensor:
    """[B, D, h, w] (any float dtype) -> float32 tokens [B, h*w, D] (row-major h*w, as DINOv2 emits them)."""
    batch, dim = features.shape[:2]
    return torch.from_numpy(np.ascontiguousarray(
        features.reshape(batch, dim, -1).transpose(0, 2, 1), dtype=np.float32))


class WindowedArrays(IterableDataset):
    """One stream over pairs of Zarr arrays (image, flip); yields one compact window at a time.

    ``pairs``: name -> (URL of the image array, URL of the flip array), [N, ...] each, read by whole blocks with
    the flip choice applied as each block arrives (so a window holds one variant per sample); ``whole``:
    name -> URL of small arrays (labels) read once. A yielded window is ``{"fields": {name: tensor}, "batches":
    k}`` whose tensors hold exactly ``k`` micro-batches, in order. Subclasses shape the window on the worker
    side (``prepare_window``) and each micro-batch on the consumer side (``finalize_batch``)."""

    READ_THREADS = 4  # blocks fetched concurrently (hides object-store latency)

    def __init__(self, pairs: Mapping[str, tuple[str, str]], plan: ShufflePlan, stream: int,
                 whole: Mapping[str, str] | None = None):
        super().__init__()
        self.pair_urls = {name: tuple(urls) for name, urls in pairs.items()}
        self.whole_urls = dict(whole or {})
        self.plan = plan
        self.stream = stream
        self.epoch = 0
        self.first_batch = 0
        self._pairs: dict[str, tuple[Any, Any]] | None = None
        self._whole: dict[str, np.ndarray] = {}

    def set_position(self, epoch: int, first_batch: int) -> None:
        self.epoch, self.first_batch = int(epoch), int(first_batch)

    def open(self) -> None:
        """(Re)open the arrays in the calling process."""
        self._pairs = {name: (open_array(plain), open_array(flipped))
                       for name, (plain, flipped) in self.pair_urls.items()}
        self._whole = {name: np.asarray(fs.retrying(open_array(url).__getitem__, slice(None)))
                       for name, url in self.whole_urls.items()}

    def read_window(self, blocks: np.ndarray, flip_of_row: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of ``blocks`` (ascending row order), each from the image or the flip array as
        ``flip_of_row[position in that order]`` says."""
        if self._pairs is None:
            self.open()
        ranges = [(int(r[0]), int(r[-1]) + 1) for r in (self.plan.block_rows(int(b)) for b in np.sort(blocks))]
        offsets = np.cumsum([0] + [stop - start for start, stop in ranges])

        def read(task: tuple[str, int]) -> tuple[str, int, np.ndarray]:
            name, i = task
            plain_array, flip_array = self._pairs[name]
            start, stop = ranges[i]
            plain = np.asarray(read_rows(plain_array, start, stop))
            flips = np.asarray(flip_of_row[offsets[i]:offsets[i + 1]])
            if flips.any():
                plain[flips] = np.asarray(read_rows(flip_array, start, stop))[flips]
            return name, i, plain

        out: dict[str, list[np.ndarray | None]] = {name: [None] * len(ranges) for name in self._pairs}
        tasks = [(name, i) for name in self._pairs for i in range(len(ranges))]
        with ThreadPoolExecutor(max_workers=min(self.READ_THREADS, len(tasks))) as pool:
            for name, i, values in pool.map(read, tasks):
                out[name][i] = values
        return {name: np.concatenate(parts) for name, parts in out.items()}

    def prepare_window(self, picked: dict[str, np.ndarray], rows: np.ndarray, flips: np.ndarray
                       ) -> dict[str, torch.Tensor]:
        """Worker side: the window's samples (already in batch order, ``rows`` and ``flips`` alongside) as
        tensors. Default: the picked arrays as they are."""
        return {name: torch.from_numpy(values) for name, values in picked.items()}

    def finalize_batch(self, fields: dict[str, torch.Tensor]) -> tuple:
        """Consumer side: one micro-batch's slice of the window fields -> the batch tuple."""
        raise NotImplementedError

    def _windows_from_position(self) -> Iterator[tuple[int, np.ndarray, int, int]]:
        """(window index, blocks, first batch, end batch) of the windows left in this epoch."""
        budget = self.plan.steps_per_epoch(self.epoch)
        done = 0
        windows = self.plan.stream_windows(self.epoch, self.stream)
        counts = self.plan.window_batch_counts(self.epoch, self.stream)
        for w, (blocks, count) in enumerate(zip(windows, counts)):
            if done >= budget:
                return
            end = min(count, budget - done)
            if end == 0:  # a window smaller than one micro-batch (e.g. only the short last block)
                continue
            if done + end > self.first_batch:
                yield w, blocks, max(0, self.first_batch - done), end
            done += end

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batch = self.plan.batch_size
        for k, (w, blocks, first, end) in enumerate(self._windows_from_position()):
            if k % workers != worker:
                continue
            rows = self.plan.window_rows(blocks)
            rng = self.plan.window_rng(self.epoch, self.stream, w)
            order = rng.permutation(len(rows))  # sample p of the window is rows[order[p]] ...
            flips = rng.random(len(rows)) < 0.5  # ... taken from the flip arrays when flips[p]
            flip_of_row = np.empty(len(rows), dtype=bool)
            flip_of_row[order] = flips
            picked = self.read_window(blocks, flip_of_row)
            used = slice(first * batch, end * batch)
            take = order[used]
            fields = self.prepare_window({name: values[take] for name, values in picked.items()}, rows[take],
                                         flips[used])
            yield {"fields": fields, "batches": end - first}


def worker_init(_: int) -> None:
    """DataLoader ``worker_init_fn``: open the arrays inside the worker."""
    info = get_worker_info()
    if info is not None:
        info.dataset.open()


class StreamBatches:
    """This rank's micro-batches, step after step across epochs, from a resumable ``(epoch, position)``.

    ``next(it)`` returns one micro-batch per local stream; ``state_dict()`` is the position after the batches
    returned so far."""

    def __init__(self, datasets: Sequence[WindowedArrays], num_workers: int = 0, epoch: int = 0,
                 position: int = 0):
        if not datasets:
            raise ValueError("StreamBatches needs at least one stream dataset")
        self.datasets = list(datasets)
        self.plan = self.datasets[0].plan
        self.workers_per_stream = num_workers // len(self.datasets) if num_workers > 0 else 0
        self.epoch, self.position = int(epoch), int(position)
        if self.position >= self.plan.steps_per_epoch(self.epoch):
            self.epoch, self.position = self.epoch + 1, 0
        self._iters: list[Iterator[tuple]] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def _stream_batches(self, dataset: WindowedArrays) -> Iterator[tuple]:
        dataset.set_position(self.epoch, self.position)
        if self.workers_per_stream == 0:
            dataset.open()
            windows: Iterable[dict[str, Any]] = dataset
        else:
            windows = DataLoader(dataset, batch_size=None, num_workers=self.workers_per_stream,
                                 worker_init_fn=worker_init, prefetch_factor=1)
        size = self.plan.batch_size
        for window in windows:
            for j in range(window["batches"]):
                yield dataset.finalize_batch({k: v[j * size:(j + 1) * size] for k, v in window["fields"].items()})

    def __iter__(self) -> "StreamBatches":
        return self

    def __next__(self) -> list[tuple]:
        if self._iters is None:
            self._iters = [self._stream_batches(d) for d in self.datasets]
        batches = [next(it) for it in self._iters]
        self.position += 1
        if self.position >= self.plan.steps_per_epoch(self.epoch):
            self.close()
            self.epoch, self.position = self.epoch + 1, 0
        return batches

    def close(self) -> None:
        for it in self._iters or []:
            it.close()  # shuts the DataLoader workers down
        self._iters = None


# ----------------------------------------------------------------------------------- SFD latent dataset

@dataclass(frozen=True)
class LatentSources:
    """Stage directories of the SFD training data and the latent statistics used to normalise it."""

    texture_url: str
    semantic_url: str
    dino_url: str | None                       # None: no REPA features are read
    texture_stats: Mapping[str, Sequence[float]]
    semantic_stats: Mapping[str, Sequence[float]]
    latent_multiplier: float = 1.0

    def pairs(self) -> dict[str, tuple[str, str]]:
        """name -> (image array URL, flip array URL)."""
        stores = [("texture", self.texture_url, FEATURES_STORE), ("semantic", self.semantic_url, LATENTS_STORE)]
        if self.dino_url:
            stores.append(("dino", self.dino_url, FEATURES_STORE))
        return {name: (array_url(url, store, name), array_url(url, store, name + FLIP_SUFFIX))
                for name, url, store in stores}

    def labels_url(self) -> str:
        return array_url(self.texture_url, FEATURES_STORE, "labels")


class SFDLatentDataset(WindowedArrays):
    """Batches ``(x [B, Ct+Cs, h, w] float32, labels [B] int64, dino [B, D, h, w] float32 or None)``.

    Per sample the image or its flip is chosen with p = 1/2 (the same choice for every array); texture and
    semantic latents are normalised with their stats, concatenated [texture | semantic] and multiplied by
    ``latent_multiplier``. REPA features are not normalised (SPEC §3); they stay in their stored dtype (fp16)
    inside a window and become float32 per batch."""

    def __init__(self, sources: LatentSources, plan: ShufflePlan, stream: int):
        super().__init__(sources.pairs(), plan, stream, whole={"labels": sources.labels_url()})
        self.sources = sources
        self.tex_mean, self.tex_std = stats_arrays(sources.texture_stats)
        self.sem_mean, self.sem_std = stats_arrays(sources.semantic_stats)

    def prepare_window(self, picked, rows, flips):
        tex = (picked["texture"].astype(np.float32) - self.tex_mean) / self.tex_std
        sem = (picked["semantic"].astype(np.float32) - self.sem_mean) / self.sem_std
        x = np.concatenate([tex, sem], axis=1)
        if self.sources.latent_multiplier != 1.0:
            x *= np.float32(self.sources.latent_multiplier)
        fields = {"x": torch.from_numpy(x), "labels": torch.from_numpy(self._whole["labels"][rows].astype(np.int64))}
        if "dino" in picked:
            fields["dino"] = torch.from_numpy(picked["dino"])
        return fields

    def finalize_batch(self, fields):
        dino = fields["dino"].float() if "dino" in fields else None
        return fields["x"], fields["labels"], dino


def sfd_plan(sources: LatentSources, batch_size: int, num_streams: int, seed: int,
             shuffle_window: int) -> ShufflePlan:
    """The shuffle plan over the SFD arrays: blocks of whole chunks of all of them, windows of about
    ``shuffle_window`` samples."""
    arrays = {url: open_array(url) for pair in sources.pairs().values() for url in pair}
    sizes = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"SFD training arrays disagree on the sample count: {sizes}")
    return plan_for_arrays(list(arrays.values()), batch_size, num_streams, seed, shuffle_window)


def plan_for_arrays(arrays: Sequence[Any], batch_size: int, num_streams: int, seed: int,
                    shuffle_window: int, num_samples: int | None = None) -> ShufflePlan:
    """A plan whose blocks are whole chunks of every array and whose windows hold about ``shuffle_window``
    samples (at least one micro-batch). ``num_samples`` limits the rows used (default: all)."""
    block = common_block_size([a.chunks[0] for a in arrays])
    window_blocks = max(math.ceil(batch_size / block), round(shuffle_window / block), 1)
    rows = num_samples if num_samples is not None else int(next(iter(arrays)).shape[0])
    return ShufflePlan(num_samples=rows, block_size=block, window_blocks=window_blocks,
                       num_streams=num_streams, batch_size=batch_size, seed=seed)
