"""Sample generation stage (``python -m sfd_core.generate``, or ``torchrun ... -m sfd_core.generate``).

Sample ``i`` (global index) gets noise from a generator seeded by ``(seed, i)`` and the balanced label of
``i`` (``sampling.labels_for_indices``). Indices are cut into shards of ``images_per_shard``; shard ``s`` belongs
to rank ``s % world_size`` and is sampled in batches of consecutive indices. Every image therefore depends only
on (config, index): not on the number of ranks, nor on which shards were done before a restart (for dopri5,
whose adaptive steps see the whole batch, as long as ``batch_size`` and ``images_per_shard`` stay the same).

Output (``out_url``): ``samples/shard-%06d.tar`` (WebDataset: ``{index:06d}.png``, ``.cls``) committed shard
by shard with a part marker each (a restart skips marked shards), then, on rank 0 once every shard is in:
``samples.npz`` (ADM layout: ``arr_0`` uint8 [N, H, W, 3] in index order), ``grid.png`` and ``_SUCCESS.json``.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from sfd_core import distributed
from sfd_core.checkpoints import load_weights
from sfd_core.config import ConfigError, load_config
from sfd_core.encoders.texture_vae import TextureVAE, load_texture_vae
from sfd_core.image_grid import grid_png
from sfd_core.imaging import encode_image, load_rgb_array
from sfd_core.models import build_model
from sfd_core.reporting import Progress, log, metric
from sfd_core.sampling import METHODS, decode_texture, labels_for_indices, sample
from sfd_core.stage_output import finished_manifest
from storage import fs
from storage.manifest import read_success, write_success
from storage.parts import PartMarkers
from storage.shards import iter_shard, write_shard

CODE_VERSION = "1"  # pipelines.stages.STAGES["sfd_samples"].code_version
STAGE = "sfd_samples"
SAMPLES_DIR = "samples"
NPZ_FILE = "samples.npz"
GRID_FILE = "grid.png"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Config:
    """Generate class-balanced samples from an SFD model and write them as PNG shards + an ADM .npz."""

    out_url: str = ""
    # The model: an sfd_model stage dir, or an explicit checkpoint + spec (official .pt or our safetensors).
    model_url: str = ""
    checkpoint: str = ""
    model_name: str = ""
    model_overrides: dict = field(default_factory=dict)
    delta_t: float = 0.3               # explicit-checkpoint runs only (a stage manifest says its own)
    latent_multiplier: float = 1.0     # explicit-checkpoint runs only
    texture_stats: str = ""            # official latents_stats.pt ({'mean','std'} [1,C,1,1]), explicit runs
    texture_url: str = ""              # texture_latents stage dir: stats when the model manifest has none
    # AutoGuidance "bad" model (optional): a stage dir, or an explicit checkpoint + spec.
    guidance_model_url: str = ""
    guidance_checkpoint: str = ""
    guidance_model_name: str = ""
    guidance_model_overrides: dict = field(default_factory=dict)
    texture_vae: dict = field(default_factory=dict)   # sfd_core.encoders.load_texture_vae spec
    standins: bool = False             # some network above is a random-init stand-in (reports say so)
    # What to sample.
    num_samples: int = 50000
    per_class: int = 50
    num_classes: int = 1000
    seed: int = 0
    # How to sample (SPEC §6).
    method: str = "euler"
    num_steps: int = 100               # grid points (N points = N - 1 Euler updates)
    cfg_scale: float = 1.0             # CFG scale; also the AutoGuidance scale unless split below
    cfg_interval_start: float = 0.0
    guidance_scale_sem: float | None = None
    guidance_scale_tex: float | None = None
    timestep_shift: float = 0.0
    atol: float = 1e-6                 # dopri5
    rtol: float = 1e-3                 # dopri5
    dopri5_per_phase: bool = False     # dopri5 restarted at each phase boundary (the official run is one solve)
    # How to run.
    batch_size: int = 64
    images_per_shard: int = 1000
    precision: str = "fp32"            # DiT autocast: fp32 | bf16
    vae_precision: str = "fp32"        # VAE decode autocast: fp32 (official) | bf16
    device: str = "auto"               # auto | cuda | cpu
    compile_mode: str = ""             # torch.compile the DiT(s): "" (eager), default, reduce-overhead, ...
    allow_tf32: bool = True            # as the official sampler (fp32 matmuls in TF32 on Ampere+)
    grid_images: int = 64
    rank: int = -1                     # -1: from the torchrun environment; set both to simulate a rank
    world_size: int = -1
    wait_timeout_s: float = 7200.0     # rank 0 waits this long for other ranks' shards (no process group)


# ------------------------------------------------------------------------------------- deterministic inputs

def index_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for sample ``index``; SeedSequence mixes (seed, index) so nearby pairs do not
    give correlated streams."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def index_noise(indices: list[int] | range, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """[len(indices), *shape] float32 standard normal noise, each row from its own (seed, index) generator."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(index_seed(seed, i))) for i in indices]
    return torch.stack(rows)


def shard_ranges(num_samples: int, images_per_shard: int) -> list[range]:
    """Index ranges of the shards: [0, k), [k, 2k), ..."""
    return [range(start, min(start + images_per_shard, num_samples))
            for start in range(0, num_samples, images_per_shard)]


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


# --------------------------------------------------------------------------------------------- models

@dataclass
class ModelSource:
    """Everything needed to rebuild one diffusion network and map its output back to texture latents."""

    name: str
    overrides: dict
    weights: str
    delta_t: float
    latent_multiplier: float
    texture_mean: list | None
    texture_std: list | None
    fingerprint: str = ""
    standins: bool = False


def _read_manifest(url: str, what: str) -> dict[str, Any]:
    manifest = fs.read_json(url) if url.endswith(".json") else read_success(url)
    if manifest is None:
        raise ConfigError(f"{what}: {url} has no _SUCCESS.json; run that stage first")
    return manifest


def _texture_stats(manifest: dict[str, Any]) -> tuple[list | None, list | None]:
    texture = (manifest.get("stats") or {}).get("texture") or {}
    return texture.get("mean"), texture.get("std")


def source_from_manifest(manifest: dict[str, Any]) -> ModelSource:
    """A ModelSource from an sfd_model/autoguidance_model manifest (EMA weights, model spec, stats, delta_t)."""
    model, config = manifest.get("model") or {}, manifest.get("config") or {}
    weights = (manifest.get("artifacts") or {}).get("ema")
    if not model.get("name") or not weights:
        raise ConfigError(f"manifest at {manifest.get('uri')} lacks model.name or artifacts.ema")
    mean, std = _texture_stats(manifest)
    return ModelSource(name=model["name"], overrides=dict(model.get("overrides") or {}), weights=weights,
                       delta_t=float(config.get("delta_t", 0.3)),
                       latent_multiplier=float(config.get("latent_multiplier", 1.0)),
                       texture_mean=mean, texture_std=std, fingerprint=manifest.get("fingerprint", ""),
                       standins=bool(manifest.get("standins")))


def _official_stats(url: str) -> tuple[list, list]:
    """mean/std of an official ``latents_stats.pt`` (``{'mean','std'}`` of shape [1, C, 1, 1])."""
    import io

    stats = torch.load(io.BytesIO(fs.read_bytes(url)), map_location="cpu", weights_only=True)
    return stats["mean"].flatten().tolist(), stats["std"].flatten().tolist()


def resolve_sources(cfg: Config) -> tuple[ModelSource, ModelSource | None]:
    """The main model (from ``model_url`` or ``checkpoint``) and the optional AutoGuidance model."""
    if bool(cfg.model_url) == bool(cfg.checkpoint):
        raise ConfigError("set exactly one of model_url (an sfd_model stage) and checkpoint (+ model_name)")
    if cfg.model_url:
        main = source_from_manifest(_read_manifest(cfg.model_url, "model_url"))
    else:
        if not cfg.model_name:
            raise ConfigError("checkpoint: also set model_name (e.g. LightningDiT-XL/1)")
        mean, std = _official_stats(cfg.texture_stats) if cfg.texture_stats else (None, None)
        main = ModelSource(cfg.model_name, dict(cfg.model_overrides), cfg.checkpoint, cfg.delta_t,
                           cfg.latent_multiplier, mean, std)
    if main.texture_mean is None and cfg.texture_url:
        texture_manifest = _read_manifest(cfg.texture_url, "texture_url")
        main.texture_mean, main.texture_std = _texture_stats(texture_manifest)
        main.standins = main.standins or bool(texture_manifest.get("standins"))
    if main.texture_mean is None or main.texture_std is None:
        raise ConfigError("no texture latent stats: the model manifest has none; set texture_url "
                          "(texture_latents stage) or texture_stats (latents_stats.pt)")
    if cfg.guidance_model_url and cfg.guidance_checkpoint:
        raise ConfigError("set at most one of guidance_model_url and guidance_checkpoint")
    guidance = None
    if cfg.guidance_model_url:
        guidance = source_from_manifest(_read_manifest(cfg.guidance_model_url, "guidance_model_url"))
    elif cfg.guidance_checkpoint:
        if not cfg.guidance_model_name:
            raise ConfigError("guidance_checkpoint: also set guidance_model_name (e.g. LightningDiT-B/1)")
        guidance = ModelSource(cfg.guidance_model_name, dict(cfg.guidance_model_overrides), cfg.guidance_checkpoint,
                               main.delta_t, main.latent_multiplier, None, None)
    return main, guidance


def prepare_network(model: torch.nn.Module, device: torch.device, compile_mode: str = ""):
    """Inference placement: on ``device``, eval, no grads, compiled with ``compile_mode`` unless it is empty."""
    model = model.to(device).eval().requires_grad_(False)
    return torch.compile(model, mode=compile_mode) if compile_mode else model


def load_network(source: ModelSource, device: torch.device, compile_mode: str = ""):
    model = build_model(source.name, **source.overrides)
    load_weights(model, source.weights)
    return prepare_network(model, device, compile_mode)


# ------------------------------------------------------------------------------------------ generation

@dataclass
class Generator:
    """The loaded networks and settings that turn global indices into uint8 images."""

    cfg: Config
    model: Any
    guidance_model: Any
    vae: TextureVAE
    source: ModelSource
    device: torch.device
    semantic_channels: int
    latent_shape: tuple[int, int, int]

    @property
    def texture_channels(self) -> int:
        return self.latent_shape[0] - self.semantic_channels

    @torch.no_grad()
    def images(self, indices: range) -> tuple[np.ndarray, np.ndarray, int]:
        """(uint8 [B, H, W, 3], labels [B], drift evaluations) for consecutive global ``indices``."""
        cfg = self.cfg
        noise = index_noise(indices, self.latent_shape, cfg.seed).to(self.device)
        labels = labels_for_indices(torch.tensor(list(indices)), cfg.num_classes, cfg.per_class, cfg.seed)
        latent, nfe = sample(
            self.model, noise, labels.to(self.device), num_steps=cfg.num_steps, method=cfg.method,
            delta_t=self.source.delta_t, semantic_channels=self.semantic_channels, cfg_scale=cfg.cfg_scale,
            cfg_interval_start=cfg.cfg_interval_start, guidance_model=self.guidance_model,
            guidance_scale_sem=cfg.guidance_scale_sem, guidance_scale_tex=cfg.guidance_scale_tex,
            timestep_shift=cfg.timestep_shift, atol=cfg.atol, rtol=cfg.rtol, return_nfe=True,
            dopri5_per_phase=cfg.dopri5_per_phase, autocast_dtype=PRECISIONS[cfg.precision])
        z = decode_texture(latent.float(), self.texture_channels, self.source.texture_mean,
                           self.source.texture_std, self.source.latent_multiplier)
        vae_dtype = PRECISIONS[cfg.vae_precision]
        with torch.autocast(self.device.type, dtype=vae_dtype, enabled=vae_dtype is not None):
            pixels = self.vae.decode_to_uint8(z)
        return pixels.cpu().numpy(), labels.numpy(), nfe


def build_generator(cfg: Config, main: ModelSource, guidance: ModelSource | None, device: torch.device) -> Generator:
    model = load_network(main, device, cfg.compile_mode)
    guidance_model = load_network(guidance, device, cfg.compile_mode) if guidance else None
    base = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    semantic_channels = int(base.semantic_channels)
    latent_shape = (int(base.in_channels), int(base.input_size), int(base.input_size))
    vae = load_texture_vae(cfg.texture_vae).to(device)
    texture_channels = latent_shape[0] - semantic_channels
    if vae.latent_channels != texture_channels or len(main.texture_mean) != texture_channels:
        raise ConfigError(f"texture channels disagree: model {texture_channels}, texture VAE {vae.latent_channels}, "
                          f"stats {len(main.texture_mean)}")
    return Generator(cfg, model, guidance_model, vae, main, device, semantic_channels, latent_shape)


def _write_shard_files(out_url: str, shard: int, indices: range, images: np.ndarray, labels: np.ndarray,
                       info: dict[str, Any]) -> None:
    """PNG-encode one shard, commit its tar, then its marker (a marker always points at a complete shard)."""
    url = fs.join(out_url, SAMPLES_DIR, f"{shard_name(shard)}.tar")
    samples = ({"__key__": f"{index:06d}", "png": encode_image(Image.fromarray(image), "png"), "cls": int(label)}
               for index, image, label in zip(indices, images, labels))
    written = write_shard(url, samples)
    PartMarkers(out_url).mark(shard_name(shard), {**info, **written, "url": url,
                                                  "first": indices.start, "stop": indices.stop})


def generate_shards(cfg: Config, generator: Generator, rank: int, world_size: int) -> int:
    """Sample this rank's unfinished shards; returns how many images were generated now."""
    markers = PartMarkers(cfg.out_url)
    done = set(markers.all())
    shards = [(s, r) for s, r in enumerate(shard_ranges(cfg.num_samples, cfg.images_per_shard))
              if s % world_size == rank and shard_name(s) not in done]
    total = sum(len(r) for _, r in shards)
    log(f"generate: rank {rank}/{world_size}: {len(shards)} shards ({total} images) to do, "
        f"{len(done)} shards already written")
    progress = Progress(total, "generate", unit="img")
    pending: Future | None = None
    # One background writer: PNG encoding and upload of shard s overlap sampling of shard s + 1.
    with ThreadPoolExecutor(max_workers=1) as writer:
        for shard, indices in shards:
            started = time.monotonic()
            images, labels, nfe_total = [], [], 0
            for start in range(indices.start, indices.stop, cfg.batch_size):
                batch = range(start, min(start + cfg.batch_size, indices.stop))
                pixels, batch_labels, nfe = generator.images(batch)
                images.append(pixels), labels.append(batch_labels)
                nfe_total += nfe * len(batch)
                progress.update(len(batch))
            seconds = time.monotonic() - started
            info = {"count": len(indices), "seconds": seconds, "rank": rank, "nfe_per_sample": nfe_total / len(indices)}
            if pending is not None:
                pending.result()  # at most one shard in flight: bounded memory, errors surface here
            pending = writer.submit(_write_shard_files, cfg.out_url, shard, indices, np.concatenate(images),
                                    np.concatenate(labels), info)
            metric(shard, img_per_s=len(indices) / seconds, nfe_per_sample=info["nfe_per_sample"])
        if pending is not None:
            pending.result()
    return total


# ------------------------------------------------------------------------------------------- assembly

def wait_for_shards(out_url: str, expected: list[str], timeout_s: float, poll_s: float = 5.0) -> dict[str, Any]:
    """Part markers of every expected shard, polling until they exist (other ranks may still be writing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = PartMarkers(out_url).all()
        missing = [name for name in expected if name not in found]
        if not missing:
            return {name: found[name] for name in expected}
        if time.monotonic() >= deadline:
            raise TimeoutError(f"generate: {len(missing)} shard(s) never arrived, e.g. {missing[:5]}; "
                               "re-run the stage to resume")
        log(f"generate: waiting for {len(missing)} shard(s) from other ranks")
        time.sleep(poll_s)


def write_npz_streaming(local_path: str, name: str, shape: tuple[int, ...], dtype: np.dtype,
                        chunks: Iterator[np.ndarray]) -> None:
    """An ``np.savez``-compatible file with one array written chunk by chunk (50K 256px images are ~10 GB;
    they never sit in memory at once). Chunks are rows of the array in order."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    rows = 0
    with zipfile.ZipFile(local_path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                if chunk.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"chunk shape {chunk.shape} does not fit array shape {shape}")
                member.write(chunk.tobytes())
                rows += len(chunk)
    if rows != shape[0]:
        raise ValueError(f"wrote {rows} rows, the header promised {shape[0]}")


def grid_indices(num_samples: int, count: int) -> list[int]:
    """Evenly spread indices, so a class-balanced run shows many classes rather than the first one or two."""
    count = min(count, num_samples)
    return sorted(set(np.linspace(0, num_samples - 1, count).round().astype(int).tolist()))


def assemble(cfg: Config, shard_info: dict[str, Any]) -> tuple[dict[str, str], tuple[int, ...]]:
    """Read the shards back in index order into ``samples.npz`` and ``grid.png``; returns their URLs and the
    image shape [H, W, 3]."""
    names = sorted(shard_info)
    wanted_grid = set(grid_indices(cfg.num_samples, cfg.grid_images))
    grid_images: list[np.ndarray] = []

    def shard_chunks() -> Iterator[np.ndarray]:
        expected = 0
        for name in names:
            images = []
            for sample_dict in iter_shard(shard_info[name]["url"]):
                if int(sample_dict["__key__"]) != expected:
                    raise ValueError(f"{name}: found sample {sample_dict['__key__']}, expected {expected:06d}")
                images.append(load_rgb_array(sample_dict["png"]))
                if expected in wanted_grid:
                    grid_images.append(images[-1])
                expected += 1
            yield np.stack(images)

    with closing(iter_shard(shard_info[names[0]]["url"])) as first_shard:
        image_shape = load_rgb_array(next(first_shard)["png"]).shape
    npz_url, grid_url = fs.join(cfg.out_url, NPZ_FILE), fs.join(cfg.out_url, GRID_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, NPZ_FILE)
        write_npz_streaming(local, "arr_0", (cfg.num_samples, *image_shape), np.uint8, shard_chunks())
        fs.put_file(local, npz_url)
    fs.write_bytes(grid_url, grid_png(np.stack(grid_images)))
    return {"npz": npz_url, "grid": grid_url}, image_shape


# ------------------------------------------------------------------------------------------------ run

def _check(cfg: Config) -> None:
    if not cfg.out_url:
        raise ConfigError("out_url: set the stage output directory")
    if cfg.method not in METHODS:
        raise ConfigError(f"method: expected one of {METHODS}, got {cfg.method!r}")
    for name in ("precision", "vae_precision"):
        if getattr(cfg, name) not in PRECISIONS:
            raise ConfigError(f"{name}: expected one of {sorted(PRECISIONS)}, got {getattr(cfg, name)!r}")
    if min(cfg.num_samples, cfg.batch_size, cfg.images_per_shard, cfg.grid_images) <= 0:
        raise ConfigError("num_samples, batch_size, images_per_shard and grid_images must be positive")
    if (cfg.rank < 0) != (cfg.world_size < 0) or cfg.rank >= max(cfg.world_size, 1):
        raise ConfigError("rank/world_size: set both (0 <= rank < world_size) or neither")


def _placement(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world size, device): simulated ranks from the config, else the torchrun environment."""
    device_kind = None if cfg.device == "auto" else cfg.device
    if cfg.rank >= 0:
        kind = device_kind or ("cuda" if torch.cuda.is_available() else "cpu")
        return cfg.rank, cfg.world_size, torch.device(kind)
    info = distributed.init_distributed(device_kind)
    return info.rank, info.world_size, info.device


def run(cfg: Config) -> dict[str, Any] | None:
    """Generate this rank's shards, then (rank 0) assemble and commit the stage. Returns the manifest on rank 0
    and on every rank of a process group; ``None`` on a simulated non-zero rank."""
    _check(cfg)
    done = finished_manifest("generate", cfg.out_url)
    if done is not None:
        return done
    rank, world_size, device = _placement(cfg)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    main, guidance = resolve_sources(cfg)
    generator = build_generator(cfg, main, guidance, device)
    started = time.monotonic()
    generated = generate_shards(cfg, generator, rank, world_size)
    del generator
    if device.type == "cuda":
        torch.cuda.empty_cache()
    distributed.barrier()
    manifest = None
    if rank == 0:
        expected = [shard_name(s) for s in range(len(shard_ranges(cfg.num_samples, cfg.images_per_shard)))]
        shard_info = wait_for_shards(cfg.out_url, expected, cfg.wait_timeout_s)
        artifacts, image_shape = assemble(cfg, shard_info)
        manifest = write_manifest(cfg, main, guidance, shard_info, artifacts, image_shape, world_size,
                                  generated, time.monotonic() - started)
    if distributed.is_distributed():
        manifest = distributed.broadcast_object(manifest)
    return manifest


def write_manifest(cfg: Config, main: ModelSource, guidance: ModelSource | None, shard_info: dict[str, Any],
                   artifacts: dict[str, str], image_shape: tuple[int, ...], world_size: int, generated_now: int,
                   seconds_now: float) -> dict:
    infos = [shard_info[name] for name in sorted(shard_info)]
    images = sum(i["count"] for i in infos)
    shard_seconds = sum(i["seconds"] for i in infos)
    per_process = images / shard_seconds if shard_seconds > 0 else 0.0
    upstream = {"sfd_model": main.fingerprint}
    if guidance is not None:
        upstream["autoguidance_model"] = guidance.fingerprint
    manifest = {
        "stage": STAGE, "fingerprint": fs.basename(cfg.out_url), "uri": cfg.out_url,
        "code_version": CODE_VERSION, "config": dataclasses.asdict(cfg), "upstream": upstream,
        "counts": {"samples": images, "shards": len(infos)},
        "stats": {"image_shape": list(image_shape)},
        "metrics": {
            # Sampling + decode time per process (shard seconds), times the ranks used: PNG writing overlaps.
            "img_per_s_per_process": per_process,
            "img_per_s": per_process * world_size,
            "world_size": world_size,
            "nfe_per_sample": sum(i["nfe_per_sample"] * i["count"] for i in infos) / images,
            "generated_this_run": generated_now,
            "seconds_this_run": seconds_now,
        },
        # "shards" is a list, as in the imagenet_shards manifest, so readers of shard sets handle both alike.
        "artifacts": {"samples": fs.join(cfg.out_url, SAMPLES_DIR), "shards": [i["url"] for i in infos],
                      **artifacts},
        "standins": bool(cfg.standins or main.standins or (guidance is not None and guidance.standins)),
    }
    log(f"generate: {images} samples, {per_process:.2f} img/s per process, npz {artifacts['npz']}")
    return write_success(cfg.out_url, manifest)


def main(argv: list[str] | None = None) -> None:
    run(load_config(Config, argv))


if __name__ == "__main__":
    main()
