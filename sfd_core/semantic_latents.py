"""Semantic latents (SPEC §3): ``python -m sfd_core.semantic_latents --config cfg.json`` (or under torchrun).

Every DINOv2 feature map of a dinov2_features stage, image and flip, goes through the trained SemVAE encoder;
the posterior is sampled (as the official extraction does) and stored in ``latents.zarr``: ``semantic`` and
``semantic_flip`` [N, Cs, h, w] float32 plus ``labels`` [N] int64.

Work is cut into the output's Zarr chunks. Each chunk is written whole and then marked done
(``storage.parts``), so a restarted run redoes only unfinished chunks; ranks take disjoint contiguous chunk
ranges. The posterior noise of a chunk is drawn in one call from a generator seeded by (seed, chunk, flip), so
the stored latents depend neither on the batch size, nor on the number of ranks, nor on interruptions.
The manifest carries per-channel stats (mean, unbiased std over up to ``stats_samples`` unflipped samples,
seeded) of the semantic latents and, copied from the texture_latents manifest, of the texture latents.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from sfd_core import distributed as dist_utils
from sfd_core.config import ConfigError, load_config
from sfd_core.latent_data import FEATURES_STORE, LATENTS_STORE, array_url, channel_stats, tokens_from_grid
from sfd_core.reporting import Progress, log
from sfd_core.semvae import SemVAE, load_semvae
from sfd_core.stage_output import finished_manifest
from sfd_core.train_semvae import WEIGHTS_FILE
from storage import fs
from storage.arrays import create_array, open_array, read_rows, write_rows
from storage.manifest import read_success, write_success
from storage.parts import PartMarkers

STAGE = "semantic_latents"
CODE_VERSION = "1"  # pipelines.stages.STAGES["semantic_latents"].code_version
ARRAYS = (("semantic", "dino"), ("semantic_flip", "dino_flip"))  # (output, input)


@dataclass
class Config:
    """Encode DINOv2 features with a trained SemVAE into semantic latents."""

    out_url: str = ""
    features_url: str = ""     # dinov2_features stage dir
    semvae_url: str = ""       # semvae stage dir, or a weights file (our .safetensors or official .pt)
    texture_url: str = ""      # texture_latents stage dir (optional): its texture stats join this manifest
    batch_size: int = 256
    chunk_size: int = 0        # samples per output chunk (0: the features' chunk length)
    seed: int = 0
    stats_samples: int = 10_000
    device: str | None = None
    allow_tf32: bool = True    # official extraction runs with TF32 matmuls on GPU


def chunk_seed(seed: int, chunk: int, flipped: bool) -> int:
    """Seed of the posterior noise of one output chunk (image or flip)."""
    return int(np.random.SeedSequence([seed, 3, chunk, int(flipped)]).generate_state(1)[0])


def rank_chunks(num_chunks: int, rank: int, world_size: int) -> range:
    """The contiguous, disjoint chunk range of ``rank``; the ranges of all ranks cover every chunk."""
    return range(num_chunks * rank // world_size, num_chunks * (rank + 1) // world_size)


def _part_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}"


def _manifest_of(url: str, field: str) -> dict[str, Any]:
    manifest = read_success(url)
    if manifest is None:
        raise ConfigError(f"Config.{field}: {url} has no _SUCCESS.json; run that stage first")
    return manifest


def load_encoder(semvae_url: str, device: torch.device) -> SemVAE:
    """The SemVAE of a semvae stage dir or weights file, in eval mode on ``device``."""
    path = semvae_url if semvae_url.endswith((".safetensors", ".pt", ".pth")) else fs.join(semvae_url, WEIGHTS_FILE)
    if fs.is_local(path):
        model = load_semvae(fs.filesystem(path)[1])
    else:  # fetch through storage (endpoint settings), then load the local copy
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, fs.basename(path))
            fs.get_file(path, local)
            model = load_semvae(local)
    return model.to(device).eval()


@torch.no_grad()
def encode_chunk(model: SemVAE, features: np.ndarray, generator: torch.Generator, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """Posterior samples [n, Cs, h, w] float32 of features [n, D, h, w]: moments in batches, then the noise of
    the whole chunk in one draw (so the result does not depend on ``batch_size``)."""
    means, logvars = [], []
    for start in range(0, len(features), batch_size):
        tokens = tokens_from_grid(features[start:start + batch_size]).to(device)
        mean, logvar = model.encode_posterior(tokens)
        means.append(mean.float())
        logvars.append(logvar.float())
    latents = model.sample_posterior(torch.cat(means), torch.cat(logvars), generator)
    return latents.cpu().numpy().astype(np.float32)


def _labels(cfg: Config, count: int) -> np.ndarray:
    """Labels from the features store, or else from the texture store."""
    candidates = [array_url(cfg.features_url, FEATURES_STORE, "labels")]
    if cfg.texture_url:
        candidates.append(array_url(cfg.texture_url, FEATURES_STORE, "labels"))
    for url in candidates:
        if fs.exists(fs.join(url, "zarr.json")):
            labels = np.asarray(open_array(url)[:], dtype=np.int64)
            if len(labels) != count:
                raise ConfigError(f"{url} holds {len(labels)} labels for {count} features")
            return labels
    raise ConfigError(f"no labels array at {candidates}; the dinov2_features (or texture_latents) stage must "
                      "write one")


def _open_or_create(url: str, shape: tuple[int, ...], dtype: Any, chunk: int, attributes: dict) -> Any:
    if fs.exists(fs.join(url, "zarr.json")):
        array = open_array(url, mode="r+")
        if tuple(array.shape) != shape or array.chunks[0] != chunk:
            raise ConfigError(f"{url} exists with shape {array.shape} / chunks {array.chunks}, expected {shape} / "
                              f"{chunk}; remove the stage directory to start over")
        return array
    return create_array(url, shape, dtype, chunks=chunk, attributes=attributes,
                        dimension_names=("n", "c", "h", "w")[:len(shape)])


def run(cfg: Config) -> dict[str, Any]:
    for name in ("out_url", "features_url", "semvae_url"):
        if not getattr(cfg, name):
            raise ConfigError(f"Config.{name}: missing; set it (see the Config docstring)")
    done = finished_manifest("semantic_latents", cfg.out_url)
    if done is not None:
        return done
    return dist_utils.run_in_process_group(cfg.device, lambda info: _encode_all(cfg, info))


def _encode_all(cfg: Config, info: dist_utils.DistInfo) -> dict[str, Any]:
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
    features_manifest = _manifest_of(cfg.features_url, "features_url")
    inputs = {name: open_array(array_url(cfg.features_url, FEATURES_STORE, name)) for _, name in ARRAYS}
    count, dim, height, width = (int(s) for s in inputs["dino"].shape)
    model = load_encoder(cfg.semvae_url, info.device)
    if (model.config["input_dim"], model.config["grid"]) != (dim, height) or height != width:
        raise ConfigError(f"the SemVAE expects {model.config['input_dim']}-d tokens on a {model.config['grid']}^2 "
                          f"grid; the features are {dim}-d on {height}x{width}")
    chunk = cfg.chunk_size or int(inputs["dino"].chunks[0])
    shape = (count, model.latent_channels, height, width)

    store = fs.join(cfg.out_url, LATENTS_STORE)
    parts = PartMarkers(cfg.out_url)
    if info.is_main:
        for out_name, in_name in ARRAYS:
            _open_or_create(fs.join(store, out_name), shape, "float32", chunk,
                            {"source": in_name, "semvae": cfg.semvae_url, "posterior": "sample"})
        if not parts.done("labels"):
            labels_array = _open_or_create(fs.join(store, "labels"), (count,), "int64", max(chunk, count), {})
            labels_array[:] = _labels(cfg, count)
            parts.mark("labels", {"count": count})
    dist_utils.barrier()
    outputs = {out_name: open_array(fs.join(store, out_name), mode="r+") for out_name, _ in ARRAYS}

    num_chunks = -(-count // chunk)
    mine = [c for c in rank_chunks(num_chunks, info.rank, info.world_size) if not parts.done(_part_name(c))]
    log(f"semantic_latents: {count} samples in {num_chunks} chunks of {chunk}; {len(mine)} left on rank "
        f"{info.rank}")
    progress = Progress(len(mine), "semantic_latents", unit="chunk")
    for c in mine:
        start, stop = c * chunk, min((c + 1) * chunk, count)
        for flipped, (out_name, in_name) in enumerate(ARRAYS):
            generator = torch.Generator(device=info.device).manual_seed(chunk_seed(cfg.seed, c, bool(flipped)))
            latents = encode_chunk(model, read_rows(inputs[in_name], start, stop), generator, cfg.batch_size,
                                   info.device)
            write_rows(outputs[out_name], start, latents)
        parts.mark(_part_name(c), {"rows": [start, stop]})
        progress.update()
    dist_utils.barrier()

    if info.is_main:
        missing = [c for c in range(num_chunks) if not parts.done(_part_name(c))]
        if missing:
            raise RuntimeError(f"chunks {missing[:10]} were not written; rerun to finish them")
        write_success(cfg.out_url, _manifest(cfg, features_manifest, outputs["semantic"], count, num_chunks, chunk))
    dist_utils.barrier()
    return read_success(cfg.out_url)


def _manifest(cfg: Config, features_manifest: dict[str, Any], semantic: Any, count: int, num_chunks: int,
              chunk: int) -> dict[str, Any]:
    upstream = {"dinov2_features": str(features_manifest.get("fingerprint", ""))}
    standins = bool(features_manifest.get("standins"))
    stats = {"semantic": channel_stats(semantic, cfg.stats_samples, cfg.seed)}
    semvae_manifest = read_success(cfg.semvae_url) if not cfg.semvae_url.endswith((".safetensors", ".pt", ".pth")) \
        else None
    if semvae_manifest is not None:
        upstream["semvae"] = str(semvae_manifest.get("fingerprint", ""))
        standins = standins or bool(semvae_manifest.get("standins"))
    if cfg.texture_url:
        texture_manifest = _manifest_of(cfg.texture_url, "texture_url")
        upstream["texture_latents"] = str(texture_manifest.get("fingerprint", ""))
        texture = (texture_manifest.get("stats") or {}).get("texture")
        if not texture or "mean" not in texture or "std" not in texture:
            log("semantic_latents: the texture manifest has no texture stats; computing them")
            texture = channel_stats(open_array(array_url(cfg.texture_url, FEATURES_STORE, "texture")),
                                    cfg.stats_samples, cfg.seed)
        stats["texture"] = texture
    store = fs.join(cfg.out_url, LATENTS_STORE)
    return {
        "stage": STAGE, "fingerprint": fs.basename(cfg.out_url), "uri": cfg.out_url, "code_version": CODE_VERSION,
        "config": dataclasses.asdict(cfg), "upstream": upstream, "standins": standins,
        "counts": {"samples": count, "chunks": num_chunks},
        "artifacts": {"latents": store, "semantic": fs.join(store, "semantic"),
                      "semantic_flip": fs.join(store, "semantic_flip"), "labels": fs.join(store, "labels")},
        "stats": stats,
        "metrics": {"chunk_size": chunk},
    }


def main(argv: Sequence[str] | None = None) -> None:
    run(load_config(Config, argv, description=__doc__.splitlines()[0]))


if __name__ == "__main__":
    main()
