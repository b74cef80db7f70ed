"""Training data over Zarr sample arrays: chunk-then-buffer shuffling, streams, resumable positions.

Reading single samples from Zarr costs a chunk decode each, so every read here is of whole chunks:

1. Blocks: the sample axis is cut into blocks that are whole chunks of every array read (lcm of the chunk
   lengths). Each epoch the block order is shuffled with ``(seed, epoch)``.
2. Streams: the global batch is split into ``num_streams`` equal micro-batches; stream ``s`` owns the blocks
   ``order[s::num_streams]``. A rank serves ``num_streams / world_size`` consecutive streams, so each block is
   read by exactly one rank, and because the stream count (not the world size) fixes who sees what, the data
   of every global step is the same on 1 or N processes.
3. Windows: a stream reads ``window_blocks`` blocks at a time, shuffles their samples together with a
   ``(seed, epoch, stream, window)`` generator (which also draws the per-sample flip choice) and cuts
   micro-batches; samples left over at the end of a window are dropped. Every stream yields the same number
   of micro-batches per epoch (the minimum over streams), so ranks stay in lockstep.

Positions are ``(epoch, batches done in that epoch)``: resuming skips whole windows without reading them.
DataLoader workers take whole windows in turn (window i -> worker i mod workers) and the loader returns them
in order, so the batch sequence does not depend on the number of workers. Arrays are opened lazily in each
process (``worker_init``), never inherited through fork.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage import fs
from storage.arrays import open_array

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


def pick_flipped(plain: np.ndarray, flipped: np.ndarray, index: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Rows ``index`` of ``plain``, taken from ``flipped`` where ``flip`` is true."""
    out = plain[index]
    out[flip] = flipped[index[flip]]
    return out


class WindowedArrays(IterableDataset):
    """One stream over Zarr arrays; yields, per window, the list of its micro-batches.

    ``arrays``: name -> URL of [N, ...] arrays read by whole blocks; ``whole``: name -> URL of small arrays
    (labels) read once. Subclasses turn window rows into a batch in ``make_batch``."""

    def __init__(self, arrays: Mapping[str, str], plan: ShufflePlan, stream: int,
                 whole: Mapping[str, str] | None = None):
        super().__init__()
        self.array_urls = dict(arrays)
        self.whole_urls = dict(whole or {})
        self.plan = plan
        self.stream = stream
        self.epoch = 0
        self.first_batch = 0
        self._arrays: dict[str, Any] | None = None
        self._whole: dict[str, np.ndarray] | None = None

    def set_position(self, epoch: int, first_batch: int) -> None:
        self.epoch, self.first_batch = int(epoch), int(first_batch)

    def open(self) -> None:
        """(Re)open the arrays in the calling process."""
        self._arrays = {name: open_array(url) for name, url in self.array_urls.items()}
        self._whole = {name: np.asarray(fs.retrying(open_array(url).__getitem__, slice(None)))
                       for name, url in self.whole_urls.items()}

    def read_window(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self.open()
        # One orthogonal selection per array: zarr fetches and decodes each touched chunk once, concurrently.
        return {name: np.asarray(fs.retrying(arr.get_orthogonal_selection, (rows,)))
                for name, arr in self._arrays.items()}

    def make_batch(self, window: dict[str, np.ndarray], whole: dict[str, np.ndarray], rows: np.ndarray,
                   index: np.ndarray, flip: np.ndarray) -> tuple:
        """Batch from window-local positions ``index`` (rows ``rows[index]``) and their flip choices."""
        raise NotImplementedError

    def _windows_from_position(self) -> Iterator[tuple[int, np.ndarray, int, int]]:
        """(window index, blocks, first batch, end batch) of the windows left in this epoch."""
        budget = self.plan.steps_per_epoch(self.epoch)
        done = 0
        windows = self.plan.stream_windows(self.epoch, self.stream)
        counts = self.plan.window_batch_counts(self.epoch, self.stream)
        for w, (blocks, count) in enumerate(zip(windows, counts)):
            end = min(count, budget - done)
            if end <= 0:
                return
            if done + end > self.first_batch:
                yield w, blocks, max(0, self.first_batch - done), end
            done += end

    def __iter__(self) -> Iterator[list[tuple]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batch = self.plan.batch_size
        for k, (w, blocks, first, end) in enumerate(self._windows_from_position()):
            if k % workers != worker:
                continue
            rows = self.plan.window_rows(blocks)
            rng = self.plan.window_rng(self.epoch, self.stream, w)
            order = rng.permutation(len(rows))
            flips = rng.random(len(rows)) < 0.5
            window = self.read_window(rows)
            if self._whole is None:
                self.open()
            yield [self.make_batch(window, self._whole, rows, order[j * batch:(j + 1) * batch],
                                   flips[j * batch:(j + 1) * batch]) for j in range(first, end)]


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
                 position: int = 0, pin_memory: bool = False):
        if not datasets:
            raise ValueError("StreamBatches needs at least one stream dataset")
        self.datasets = list(datasets)
        self.plan = self.datasets[0].plan
        self.workers_per_stream = num_workers // len(self.datasets) if num_workers > 0 else 0
        self.pin_memory = pin_memory
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
            for window in dataset:
                yield from window
            return
        loader = DataLoader(dataset, batch_size=None, num_workers=self.workers_per_stream,
                            worker_init_fn=worker_init, prefetch_factor=1, pin_memory=self.pin_memory)
        for window in loader:
            yield from window

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

    def arrays(self) -> dict[str, str]:
        urls = {}
        for name in ("texture", "texture" + FLIP_SUFFIX):
            urls[name] = array_url(self.texture_url, FEATURES_STORE, name)
        for name in ("semantic", "semantic" + FLIP_SUFFIX):
            urls[name] = array_url(self.semantic_url, LATENTS_STORE, name)
        if self.dino_url:
            for name in ("dino", "dino" + FLIP_SUFFIX):
                urls[name] = array_url(self.dino_url, FEATURES_STORE, name)
        return urls

    def labels_url(self) -> str:
        return array_url(self.texture_url, FEATURES_STORE, "labels")


class SFDLatentDataset(WindowedArrays):
    """Batches ``(x [B, Ct+Cs, h, w] float32, labels [B] int64, dino [B, D, h, w] float32 or None)``.

    Per sample the image or its flip is chosen with p = 1/2 (the same choice for every array); texture and
    semantic latents are normalised with their stats, concatenated [texture | semantic] and multiplied by
    ``latent_multiplier``. REPA features are not normalised (SPEC §3)."""

    def __init__(self, sources: LatentSources, plan: ShufflePlan, stream: int):
        super().__init__(sources.arrays(), plan, stream, whole={"labels": sources.labels_url()})
        self.sources = sources
        self.tex_mean, self.tex_std = stats_arrays(sources.texture_stats)
        self.sem_mean, self.sem_std = stats_arrays(sources.semantic_stats)

    def make_batch(self, window, whole, rows, index, flip):
        tex = pick_flipped(window["texture"], window["texture_flip"], index, flip).astype(np.float32)
        sem = pick_flipped(window["semantic"], window["semantic_flip"], index, flip).astype(np.float32)
        x = np.concatenate([(tex - self.tex_mean) / self.tex_std, (sem - self.sem_mean) / self.sem_std], axis=1)
        if self.sources.latent_multiplier != 1.0:
            x *= np.float32(self.sources.latent_multiplier)
        labels = torch.from_numpy(whole["labels"][rows[index]].astype(np.int64))
        dino = None
        if "dino" in window:
            dino = torch.from_numpy(pick_flipped(window["dino"], window["dino_flip"], index, flip)
                                    .astype(np.float32))
        return torch.from_numpy(x), labels, dino


def sfd_plan(sources: LatentSources, batch_size: int, num_streams: int, seed: int,
             shuffle_window: int = 512) -> ShufflePlan:
    """The shuffle plan over the SFD arrays: blocks of whole chunks of all of them, windows of about
    ``shuffle_window`` samples."""
    arrays = {name: open_array(url) for name, url in sources.arrays().items()}
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
