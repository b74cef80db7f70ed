"""Stages ``texture_latents`` and ``dinov2_features``: encode every shard image and its h-flip into Zarr.

    python -m sfd_core.extract_features --config cfg.json [--set key=value ...]     (or under torchrun)

Output ``features.zarr`` (rows aligned with the shard order of the ``imagenet_shards`` manifest):
- texture: ``texture``, ``texture_flip`` [N, C, h, w] (``dtype``): texture-VAE posterior samples
  ``(mean + std * eps) * scaling_factor`` of x = ToTensor -> Normalize(0.5, 0.5) of the stored ADM crop (SPEC §3);
- dinov2: ``dino``, ``dino_flip`` [N, D, h, w] float16: ``features_from_adm`` patch tokens (SPEC §1.1, §3);
- ``labels`` [N] int64.
The flip is ``x.flip(-1)``, pixel-exact with flipping the image first. The noise ``eps`` of row ``i`` is drawn
on the CPU from ``torch.Generator().manual_seed(noise_seed(seed, i, flipped))`` as float32, so the latents do not
depend on batch size, device, resume point or rank split.

Work is cut into chunks of ``chunk_size`` rows (= the Zarr chunk along N). A chunk's arrays are written, then its
part marker, so a killed run resumes at the first unmarked chunk. Ranks (``rank``/``world_size`` or the torchrun
environment) take contiguous, disjoint chunk ranges; rank 0 creates the arrays before anyone writes and writes
the manifest once every chunk is marked. Texture stats (per-channel mean and unbiased std over ``stats_samples``
seeded rows of ``texture``) are merged from per-chunk partial moments kept in the chunk markers.

Bad input: rows must stay aligned with the shards (and between the texture and DINOv2 stores), so a damaged shard
is never skipped: a shard that is missing, truncated (fewer or more samples than the shards manifest's
``per_shard`` count, or a tar cut inside a member), or holds an image or label that cannot be decoded stops the
stage with an error naming the shard, the sample and how to rebuild it. Undecodable *source* images were
already skipped (and counted) by ``imagenet_shards``. A shard stream broken by a storage outage is reopened with
backoff and continues at the next sample; when storage stays down past the retries the stage stops saying so,
and a rerun resumes at the first unmarked chunk.
"""
from __future__ import annotations

import dataclasses
import os
import random
import tarfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sfd_core.config import ConfigError, load_config
from sfd_core.encoders.group_norm import use_channels_last_group_norm
from sfd_core.imaging import load_rgb_array
from sfd_core.reporting import Progress, log
from sfd_core.stage_output import finished_manifest
from storage import fs
from storage.arrays import create_array, open_array, write_rows
from storage.manifest import read_success, write_success
from storage.parts import PartMarkers
from storage.shards import iter_shard

CODE_VERSION = "1"
ENCODERS = ("texture", "dinov2")
STAGE_OF = {"texture": "texture_latents", "dinov2": "dinov2_features"}
ARRAYS_OF = {"texture": ("texture", "texture_flip"), "dinov2": ("dino", "dino_flip")}
FEATURES_STORE = "features.zarr"
LATENT_STATS_FILE = "latents_stats.json"
STORE_DTYPES = ("float32", "float16")
PRECISIONS = ("fp32", "tf32", "bf16")
ARRAYS_PART = "arrays"
POLL_SECONDS = 1.0
MAX_PENDING_WRITES = 2


@dataclass
class Config:
    """Encode the images of an imagenet_shards output (and their h-flips) with the texture VAE or DINOv2."""
    encoder: str = "texture"
    shards_url: str = ""               # imagenet_shards stage dir (its _SUCCESS.json lists shards and counts)
    out_url: str = ""
    texture_vae: dict = field(default_factory=dict)   # sfd_core.encoders.load_texture_vae spec
    dinov2: dict = field(default_factory=dict)        # sfd_core.encoders.load_dinov2 spec
    batch_size: int = 64
    num_workers: int = 4
    device: str = "auto"
    dtype: str = "float32"             # texture storage dtype; DINOv2 features are always float16
    precision: str = "fp32"            # fp32 | tf32 (TF32 matmul/conv) | bf16 (weights and inputs)
    chunk_size: int = 256              # rows per Zarr chunk and per resume unit
    stats_samples: int = 10000
    seed: int = 0
    compile: bool = False
    channels_last: bool = True
    rank: int | None = None            # None: RANK from the environment (torchrun), else 0
    world_size: int | None = None      # None: WORLD_SIZE from the environment, else 1
    wait_timeout_s: float = 6 * 3600.0  # how long ranks wait for each other
    standins: bool = False             # the encoder weights are random-init stand-ins (reports say so)


# ------------------------------------------------------------------------------------------ config, ranks

def check_config(cfg: Config) -> None:
    where = "extract_features"
    if cfg.encoder not in ENCODERS:
        raise ConfigError(f"{where}.encoder: {cfg.encoder!r}; valid: {list(ENCODERS)}")
    if not cfg.out_url:
        raise ConfigError(f"{where}.out_url: missing; set it to the stage output directory")
    if not cfg.shards_url:
        raise ConfigError(f"{where}.shards_url: missing; set it to the imagenet_shards stage directory")
    spec_field = "texture_vae" if cfg.encoder == "texture" else "dinov2"
    if not getattr(cfg, spec_field):
        raise ConfigError(f"{where}.{spec_field}: missing; give the encoder's loader spec (e.g. its 'path')")
    if cfg.dtype not in STORE_DTYPES:
        raise ConfigError(f"{where}.dtype: {cfg.dtype!r}; valid: {list(STORE_DTYPES)}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"{where}.precision: {cfg.precision!r}; valid: {list(PRECISIONS)}")
    for name in ("batch_size", "chunk_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_workers < 0 or cfg.stats_samples < 1:
        raise ConfigError(f"{where}: num_workers must be >= 0 and stats_samples >= 1")


def rank_and_world(cfg: Config) -> tuple[int, int]:
    rank = cfg.rank if cfg.rank is not None else int(os.environ.get("RANK", "0"))
    world = cfg.world_size if cfg.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ConfigError(f"extract_features.rank: {rank} is outside [0, world_size={world})")
    return rank, world


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def set_precision(precision: str) -> None:
    """TF32 only when asked for ("tf32"); "bf16" casts weights instead (see the encoders below)."""
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def chunk_ranges(num_rows: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]


def rank_chunks(num_chunks: int, rank: int, world: int) -> range:
    """A contiguous, balanced block of chunk ids per rank (contiguous keeps shard reads sequential)."""
    return range(num_chunks * rank // world, num_chunks * (rank + 1) // world)


def noise_seed(seed: int, index: int, flipped: bool) -> int:
    """Seed of row ``index``'s posterior noise (image or flip); unique per (seed, index, flip)."""
    return (int(seed) << 40) + 2 * int(index) + int(flipped)


def sample_noise(seed: int, index: int, flipped: bool, shape: Sequence[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(noise_seed(seed, index, flipped))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ reading

class CorruptShardError(RuntimeError):
    """A shard of the imagenet_shards output cannot be read as its manifest describes."""


def _rebuild_hint(url: str) -> str:
    name = fs.basename(url).removesuffix(".tar")
    return (f"rebuild it: delete {name}.json under the imagenet_shards stage's _parts/ and its _SUCCESS.json, "
            "then rerun imagenet_shards (only that shard is redone) and this stage")


def _retry_attempts() -> int:
    return int(os.environ.get(fs.RETRY_ATTEMPTS_ENV_VAR, fs.DEFAULT_RETRY_ATTEMPTS))


def read_shard(url: str, count: int, stop: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples ``[0, stop)`` (default: all) of a shard the manifest says holds ``count`` samples, each with
    ``__url__`` and ``__index__`` set. Read to its end, the shard must hold exactly ``count`` samples. A transient
    storage error reopens the shard (backoff as ``storage.fs.retrying``) and continues after the last sample;
    anything else raises ``CorruptShardError`` naming the shard."""
    stop = count if stop is None else min(stop, count)
    delivered, failures = 0, 0
    while True:
        position = 0
        try:
            for sample in iter_shard(url):
                if position >= stop:
                    if stop == count:  # read to the end: one more sample means the count is wrong
                        raise CorruptShardError(f"{url}: shard holds more than the {count} samples the shards "
                                                f"manifest lists; {_rebuild_hint(url)}")
                    return
                if position >= delivered:
                    sample["__url__"], sample["__index__"] = url, position
                    yield sample
                    delivered += 1
                position += 1
            if position < stop:
                raise CorruptShardError(f"{url}: shard ends after {position} samples, the shards manifest says "
                                        f"{count} (truncated tar?); {_rebuild_hint(url)}")
            return
        except CorruptShardError:
            raise
        except Exception as error:  # noqa: BLE001 - classified right below
            failures += 1
            if fs.is_transient(error) and failures < _retry_attempts():
                time.sleep(min(10.0, 0.25 * 2 ** (failures - 1)) * (0.5 + 0.5 * random.random()))
                continue
            if fs.is_transient(error):
                raise RuntimeError(f"{url}: storage error reading the shard after {failures} attempts "
                                   f"({type(error).__name__}: {error}); rerun to resume") from error
            if isinstance(error, FileNotFoundError):
                raise CorruptShardError(f"{url}: shard listed in the shards manifest is missing; "
                                        f"{_rebuild_hint(url)}") from error
            if isinstance(error, (tarfile.TarError, EOFError, ValueError)):
                raise CorruptShardError(f"{url}: cannot read sample {position} of {count} ({type(error).__name__}: "
                                        f"{error}); the tar is damaged; {_rebuild_hint(url)}") from error
            raise


def iter_rows(shard_urls: Sequence[str], shard_counts: Sequence[int], start: int, stop: int
              ) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row, raw sample)`` for rows ``[start, stop)`` of the shards taken in order; shards before ``start`` are
    not opened, earlier samples of the first shard are read past without decoding. Every shard read to its end
    is checked against its manifest count (``read_shard``), so rows never shift to another shard's labels."""
    first_row = 0
    for url, count in zip(shard_urls, shard_counts):
        if first_row + count > start and first_row < stop:
            for sample in read_shard(url, count, stop - first_row):
                row = first_row + sample["__index__"]
                if row >= start:
                    yield row, sample
        first_row += count
        if first_row >= stop:
            return


def validate_shards_manifest(manifest: dict[str, Any], shards_url: str) -> tuple[list[str], list[int]]:
    """Shard URLs and per-shard counts of an imagenet_shards manifest, checked for internal consistency."""
    where = f"extract_features.shards_url: {shards_url}/_SUCCESS.json"
    try:
        urls, counts = list(manifest["artifacts"]["shards"]), [int(c) for c in manifest["counts"]["per_shard"]]
        total, listed = int(manifest["counts"]["images"]), int(manifest["counts"]["shards"])
        int(manifest["config"]["resolution"])
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{where} is not an imagenet_shards manifest (missing or bad {error})") from error
    if len(urls) != len(counts) or len(urls) != listed:
        raise ConfigError(f"{where} lists {len(urls)} shard URLs, {len(counts)} per-shard counts and "
                          f"counts.shards={listed}; they must agree")
    if any(c < 0 for c in counts) or sum(counts) != total:
        raise ConfigError(f"{where}: per-shard counts {counts} do not add up to counts.images={total}")
    return urls, counts


def image_tensor(sample: dict[str, Any]) -> torch.Tensor:
    data = sample.get("jpg", sample.get("png"))
    where = f"{sample.get('__url__', 'shard')}: sample {sample.get('__key__')!r}"
    if data is None:
        raise CorruptShardError(f"{where} has no jpg or png image; {_rebuild_hint(sample.get('__url__', ''))}")
    try:
        return torch.from_numpy(load_rgb_array(data)).permute(2, 0, 1)
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError... on bad bytes
        raise CorruptShardError(f"{where} (#{sample.get('__index__')} in the shard): image cannot be decoded "
                                f"({type(error).__name__}: {error}); {_rebuild_hint(sample.get('__url__', ''))}"
                                ) from error


def sample_label(sample: dict[str, Any]) -> int:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError) as error:
        raise CorruptShardError(f"{sample.get('__url__', 'shard')}: sample {sample.get('__key__')!r} has no valid "
                                f"cls label ({error!r}); {_rebuild_hint(sample.get('__url__', ''))}") from error


class ChunkBatches(IterableDataset):
    """Batches that never cross a chunk: {"chunk", "start", "images" uint8 [B, 3, H, W], "labels" int64 [B],
    and with ``noise_shape`` "noise"/"noise_flip" float32 [B, *noise_shape]}. DataLoader workers each take a
    contiguous block of the chunks, so every shard is streamed about once."""

    def __init__(self, shard_urls: Sequence[str], shard_counts: Sequence[int], chunks: Sequence[tuple[int, int, int]],
                 batch_size: int, seed: int, noise_shape: Sequence[int] | None):
        self.shard_urls, self.shard_counts = list(shard_urls), list(shard_counts)
        self.chunks = list(chunks)  # (chunk id, start row, stop row), ascending
        self.batch_size, self.seed = batch_size, seed
        self.noise_shape = tuple(noise_shape) if noise_shape else None

    def _my_chunks(self) -> list[tuple[int, int, int]]:
        worker = get_worker_info()
        if worker is None:
            return self.chunks
        n = len(self.chunks)
        return self.chunks[n * worker.id // worker.num_workers: n * (worker.id + 1) // worker.num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        mine = self._my_chunks()
        run: list[tuple[int, int, int]] = []
        for chunk in mine + [None]:  # group chunks into runs of contiguous rows, one stream per run
            if chunk is not None and (not run or run[-1][2] == chunk[1]):
                run.append(chunk)
                continue
            if run:
                yield from self._batches(run)
            run = [chunk] if chunk is not None else []

    def _batches(self, run: list[tuple[int, int, int]]) -> Iterator[dict[str, Any]]:
        rows = iter_rows(self.shard_urls, self.shard_counts, run[0][1], run[-1][2])
        for chunk_id, start, stop in run:
            for batch_start in range(start, stop, self.batch_size):
                batch_stop = min(batch_start + self.batch_size, stop)
                samples = [next(rows) for _ in range(batch_start, batch_stop)]
                assert samples[0][0] == batch_start
                batch = {"chunk": chunk_id, "start": batch_start,
                         "images": torch.stack([image_tensor(s) for _, s in samples]),
                         "labels": torch.tensor([sample_label(s) for _, s in samples], dtype=torch.int64)}
                if self.noise_shape:
                    for key, flipped in (("noise", False), ("noise_flip", True)):
                        batch[key] = torch.stack([sample_noise(self.seed, i, flipped, self.noise_shape)
                                                  for i in range(batch_start, batch_stop)])
                yield batch


# ----------------------------------------------------------------------------------------------- encoders

def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 in [-1, 1] with torchvision's ops: ToTensor (x / 255) then Normalize(0.5, 0.5)."""
    return (images.float() / 255.0 - 0.5) / 0.5


def _pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad a short batch to the compiled size (one graph for every batch)."""
    return x if len(x) == size else torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])


class TextureEncoder:
    """Posterior samples of images and flips in one forward: the fast path (bf16 weights, channels_last,
    torch.compile, padded fixed-size batches) and the plain fp32 path share this code."""

    def __init__(self, vae: Any, device: torch.device, precision: str, compile: bool, channels_last: bool,
                 batch_size: int):
        self.scaling_factor = float(vae.scaling_factor)
        self.latent_channels = int(vae.latent_channels)
        self.downsample = int(vae.downsample)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.channels_last = channels_last
        self.autoencoder = vae.autoencoder.to(device=device, dtype=self.dtype)
        if channels_last:
            self.autoencoder.to(memory_format=torch.channels_last)
            if compile:  # the stock GroupNorm compiles to strided NHWC reductions (see encoders.group_norm)
                use_channels_last_group_norm(self.autoencoder.encoder)
        self.device, self.compiled_batch = device, 2 * batch_size if compile else None
        self._moments: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = self._posterior_moments
        if compile:
            self._moments = torch.compile(self._posterior_moments, dynamic=False)

    def output_shape(self, resolution: int) -> tuple[int, int, int]:
        return (self.latent_channels, resolution // self.downsample, resolution // self.downsample)

    def _posterior_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        posterior = self.autoencoder.encode(x).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, noise: torch.Tensor, noise_flip: torch.Tensor) -> dict[str, torch.Tensor]:
        x = to_model_input(images.to(self.device, non_blocking=True))
        n = len(x)
        both = torch.cat([x, x.flip(-1)])
        mean, std = self._moments(_pad_batch(both, self.compiled_batch) if self.compiled_batch else both)
        eps = torch.cat([noise, noise_flip]).to(self.device, non_blocking=True)
        z = (mean[: 2 * n] + std[: 2 * n] * eps) * self.scaling_factor
        return {"texture": z[:n], "texture_flip": z[n:]}


class DinoEncoder:
    """DINOv2 patch tokens [B, D, h, w] of images and flips in one forward (same fast-path options)."""

    def __init__(self, dino: Any, device: torch.device, precision: str, compile: bool, channels_last: bool,
                 batch_size: int):
        self.embed_dim, self.grid = int(dino.embed_dim), int(dino.grid)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.channels_last = channels_last
        self.dino = dino.to(device=device, dtype=self.dtype)
        self.device, self.compiled_batch = device, 2 * batch_size if compile else None
        self._features: Callable[[torch.Tensor], torch.Tensor] = self._forward
        if compile:
            self._features = torch.compile(self._forward, dynamic=False)

    def output_shape(self, resolution: int) -> tuple[int, int, int]:
        return (self.embed_dim, self.grid, self.grid)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.dino.features_from_adm(x)  # resizes in float32, runs the ViT in its weight dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, noise: Any = None, noise_flip: Any = None) -> dict[str, torch.Tensor]:
        x = to_model_input(images.to(self.device, non_blocking=True))
        n = len(x)
        both = torch.cat([x, x.flip(-1)])
        feats = self._features(_pad_batch(both, self.compiled_batch) if self.compiled_batch else both)[: 2 * n]
        return {"dino": feats[:n], "dino_flip": feats[n:]}


def build_encoder(cfg: Config, device: torch.device) -> TextureEncoder | DinoEncoder:
    from sfd_core.encoders import load_dinov2, load_texture_vae

    options = dict(device=device, precision=cfg.precision, compile=cfg.compile, channels_last=cfg.channels_last,
                   batch_size=cfg.batch_size)
    if cfg.encoder == "texture":
        return TextureEncoder(load_texture_vae(cfg.texture_vae), **options)
    return DinoEncoder(load_dinov2(cfg.dinov2), **options)


# --------------------------------------------------------------------------------------------------- stats

def stats_rows(num_rows: int, stats_samples: int, seed: int) -> np.ndarray:
    """The sorted rows whose (unflipped) latents give the texture stats."""
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(num_rows, size=min(num_rows, stats_samples), replace=False))


def chunk_moments(values: np.ndarray) -> dict[str, Any]:
    """Per-channel count, mean and sum of squared deviations (float64) of [n, C, h, w] values."""
    x = values.astype(np.float64)
    axes = (0, *range(2, x.ndim))
    count = int(x.size // x.shape[1]) if len(x) else 0
    mean = x.mean(axis=axes) if count else np.zeros(x.shape[1])
    m2 = ((x - mean.reshape(1, -1, *([1] * (x.ndim - 2)))) ** 2).sum(axis=axes) if count else np.zeros(x.shape[1])
    return {"count": count, "mean": mean.tolist(), "m2": m2.tolist()}


def merge_moments(parts: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Chan et al.'s pairwise merge -> {"mean", "std" (unbiased)}, as ``x.mean/std(dim=[0, 2, 3])`` would give."""
    count, mean, m2 = 0, None, None
    for part in parts:
        n_b = part["count"]
        if not n_b:
            continue
        mean_b, m2_b = np.asarray(part["mean"]), np.asarray(part["m2"])
        if mean is None:
            count, mean, m2 = n_b, mean_b, m2_b
            continue
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * n_b / total
        m2 = m2 + m2_b + delta ** 2 * count * n_b / total
        count = total
    if mean is None or count < 2:
        raise ValueError("texture stats need at least two values per channel")
    return {"mean": mean.tolist(), "std": np.sqrt(m2 / (count - 1)).tolist()}


# ------------------------------------------------------------------------------------------------ the stage

def _chunk_part(chunk_id: int) -> str:
    return f"chunk-{chunk_id:06d}"


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"extract_features: gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_SECONDS)


def _read_shards_manifest(cfg: Config) -> dict[str, Any]:
    manifest = read_success(cfg.shards_url)
    if manifest is None:
        raise ConfigError(f"extract_features.shards_url: {cfg.shards_url!r} has no _SUCCESS.json; run the "
                          "imagenet_shards stage first or point the field at its output directory")
    return manifest


def _create_arrays(cfg: Config, urls: dict[str, str], num_rows: int, shape: tuple[int, ...], markers: PartMarkers
                   ) -> None:
    store_dtype = "float16" if cfg.encoder == "dinov2" else cfg.dtype
    attributes = {"encoder": cfg.encoder, "seed": cfg.seed, "precision": cfg.precision}
    for name in ARRAYS_OF[cfg.encoder]:
        create_array(urls[name], (num_rows, *shape), store_dtype, cfg.chunk_size, attributes=attributes,
                     overwrite=True, dimension_names=("n", "c", "h", "w"))
    create_array(urls["labels"], (num_rows,), "int64", cfg.chunk_size, overwrite=True, dimension_names=("n",))
    markers.mark(ARRAYS_PART, {"rows": num_rows, "shape": list(shape), "dtype": store_dtype})


def run(cfg: Config) -> dict[str, Any]:
    check_config(cfg)
    done = finished_manifest(STAGE_OF[cfg.encoder], cfg.out_url)
    if done is not None:
        return done
    rank, world = rank_and_world(cfg)
    shards = _read_shards_manifest(cfg)
    shard_urls, shard_counts = validate_shards_manifest(shards, cfg.shards_url)
    num_rows, resolution = int(sum(shard_counts)), int(shards["config"]["resolution"])
    device = resolve_device(cfg.device)
    set_precision(cfg.precision)
    encoder = build_encoder(cfg, device)
    shape = encoder.output_shape(resolution)
    names = ARRAYS_OF[cfg.encoder]
    urls = {name: fs.join(cfg.out_url, FEATURES_STORE, name) for name in (*names, "labels")}
    markers = PartMarkers(cfg.out_url)
    if rank == 0 and not markers.done(ARRAYS_PART):
        _create_arrays(cfg, urls, num_rows, shape, markers)
    _wait_for(lambda: markers.done(ARRAYS_PART), cfg.wait_timeout_s, "rank 0 to create the arrays")
    arrays = {name: open_array(url, mode="r+") for name, url in urls.items()}

    chunks = chunk_ranges(num_rows, cfg.chunk_size)
    finished = set(_finished_chunk_parts(markers))
    mine = [(c, *chunks[c]) for c in rank_chunks(len(chunks), rank, world) if _chunk_part(c) not in finished]
    log(f"{STAGE_OF[cfg.encoder]}: rank {rank}/{world} on {device}: {len(mine)} of {len(chunks)} chunks to do, "
        f"{num_rows} images x2 (flip) -> {shape} per image")
    started = time.monotonic()
    try:
        encoded = _encode_chunks(cfg, encoder, device, shard_urls, shard_counts, mine, arrays, markers,
                                 stats_rows(num_rows, cfg.stats_samples, cfg.seed) if cfg.encoder == "texture"
                                 else None, shape)
    except Exception as error:
        if fs.is_transient(error):  # storage.fs already retried with backoff: the store is down for longer
            raise RuntimeError(f"{STAGE_OF[cfg.encoder]}: storage still failing after retries while reading shards "
                               f"or writing {cfg.out_url} ({type(error).__name__}: {error}); the chunks committed "
                               "so far stay done: rerun the stage to resume") from error
        raise
    seconds = time.monotonic() - started
    if rank != 0:
        _wait_for(lambda: read_success(cfg.out_url) is not None, cfg.wait_timeout_s, "rank 0's manifest")
        return read_success(cfg.out_url)
    expected = {_chunk_part(c) for c in range(len(chunks))}
    _wait_for(lambda: expected <= set(_finished_chunk_parts(markers)), cfg.wait_timeout_s, "the other ranks' chunks")
    return _finish(cfg, shards, markers, urls, num_rows, len(chunks), shape, encoded, seconds, world)


def _finished_chunk_parts(markers: PartMarkers) -> list[str]:
    """Names of marked chunks, from one listing (reading every marker would be a request per chunk)."""
    return [fs.basename(url)[: -len(".json")] for url in fs.ls(markers.dir_url)
            if fs.basename(url).startswith("chunk-") and url.endswith(".json")]


def _encode_chunks(cfg: Config, encoder: TextureEncoder | DinoEncoder, device: torch.device,
                   shard_urls: Sequence[str], shard_counts: Sequence[int], chunks: list[tuple[int, int, int]],
                   arrays: dict[str, Any], markers: PartMarkers, stats_selection: np.ndarray | None,
                   shape: tuple[int, ...]) -> int:
    """Encode and commit ``chunks``; returns the number of images encoded (each also flipped)."""
    if not chunks:
        return 0
    dataset = ChunkBatches(shard_urls, shard_counts, chunks, cfg.batch_size, cfg.seed,
                           shape if cfg.encoder == "texture" else None)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    store_dtype = np.float16 if cfg.encoder == "dinov2" else np.dtype(cfg.dtype)
    bounds = {c: (start, stop) for c, start, stop in chunks}
    open_chunks: dict[int, dict[str, list[np.ndarray]]] = {}
    progress = Progress(sum(stop - start for _, start, stop in chunks), STAGE_OF[cfg.encoder], unit="img")
    pending: list[Future] = []
    encoded = 0
    with ThreadPoolExecutor(max_workers=1) as writer:  # commits overlap with the next batches' compute
        for batch in loader:
            outputs = encoder(batch["images"], batch.get("noise"), batch.get("noise_flip"))
            parts = open_chunks.setdefault(batch["chunk"], {name: [] for name in (*outputs, "labels")})
            for name, value in outputs.items():
                parts[name].append(value.float().cpu().numpy().astype(store_dtype))
            parts["labels"].append(batch["labels"].numpy())
            encoded += len(batch["labels"])
            progress.update(len(batch["labels"]))
            start, stop = bounds[batch["chunk"]]
            if sum(len(x) for x in parts["labels"]) == stop - start:
                data = {name: np.concatenate(values) for name, values in open_chunks.pop(batch["chunk"]).items()}
                pending.append(writer.submit(_commit_chunk, batch["chunk"], start, data, arrays, markers,
                                             stats_selection))
                while len(pending) > MAX_PENDING_WRITES:
                    pending.pop(0).result()
        for future in pending:
            future.result()
    if open_chunks:
        raise RuntimeError(f"extract_features: chunks {sorted(open_chunks)} did not receive all their rows")
    return encoded


def _commit_chunk(chunk_id: int, start: int, data: dict[str, np.ndarray], arrays: dict[str, Any],
                  markers: PartMarkers, stats_selection: np.ndarray | None) -> None:
    """Write the chunk's rows of every array, then its marker (with the stats moments of its selected rows)."""
    stop = start + len(data["labels"])
    for name, values in data.items():
        write_rows(arrays[name], start, values)
    info: dict[str, Any] = {"rows": [start, stop]}
    if stats_selection is not None:
        rows = stats_selection[(stats_selection >= start) & (stats_selection < stop)] - start
        info["stats_moments"] = chunk_moments(data["texture"][rows])
    markers.mark(_chunk_part(chunk_id), info)


def _finish(cfg: Config, shards: dict[str, Any], markers: PartMarkers, urls: dict[str, str], num_rows: int,
            num_chunks: int, shape: tuple[int, ...], encoded: int, seconds: float, world: int) -> dict[str, Any]:
    stage = STAGE_OF[cfg.encoder]
    artifacts = {"features": fs.join(cfg.out_url, FEATURES_STORE), **urls}
    stats: dict[str, Any] = {"images_encoded_this_run": encoded,
                             "throughput_img_per_s": encoded / seconds if encoded and seconds > 0 else 0.0,
                             "world_size": world, "shape": list(shape)}
    if cfg.encoder == "texture":
        parts = markers.all()
        moments = [parts[_chunk_part(c)]["stats_moments"] for c in range(num_chunks)]
        texture_stats = merge_moments(moments)
        stats["texture"] = {**texture_stats, "samples": int(min(num_rows, cfg.stats_samples))}
        # The official latents_stats.pt holds {"mean", "std"} tensors shaped [1, C, 1, 1]; same here as JSON.
        artifacts["latents_stats"] = fs.join(cfg.out_url, LATENT_STATS_FILE)
        fs.write_json(artifacts["latents_stats"],
                      {key: [[[[v]] for v in texture_stats[key]]] for key in ("mean", "std")})
    manifest = {
        "stage": stage, "fingerprint": fs.basename(cfg.out_url), "uri": cfg.out_url,
        "code_version": CODE_VERSION, "config": dataclasses.asdict(cfg),
        "upstream": {"imagenet_shards": shards.get("fingerprint", "")},
        "standins": bool(cfg.standins or shards.get("standins")),
        "counts": {"images": num_rows, "chunks": num_chunks, "classes": shards["counts"].get("classes")},
        "stats": stats, "metrics": {}, "artifacts": artifacts,
    }
    log(f"{stage}: {num_rows} images -> {artifacts['features']}")
    return write_success(cfg.out_url, manifest)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(load_config(Config, argv))


if __name__ == "__main__":
    main()
