"""The stage table: which program builds each asset and which config fields carry upstream URIs.

Values of the stage configs live in the profile YAML files; this table only says how assets are wired to the
programs of ``sfd_core`` (docs/internals.md). ``code_version`` enters every fingerprint: bump it when a stage's
output changes for the same config.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageSpec:
    asset: str                      # asset name = directory name under the storage root
    module: str                     # sfd_core.<stage> with Config and run(cfg)
    code_version: str
    group: str
    description: str
    inputs: dict[str, str] = field(default_factory=dict)   # config field -> upstream asset (its manifest "uri")
    gpu: bool = True                # launched with torchrun on GPUs, in the "gpu" pool


STAGES: dict[str, StageSpec] = {s.asset: s for s in [
    StageSpec("imagenet_shards", "sfd_core.imagenet_shards", "2", "data",  # 2: shuffled shard order
              "ImageNet-style images as WebDataset tars (ADM center crop to the profile resolution).",
              gpu=False),
    StageSpec("texture_latents", "sfd_core.extract_features", "2", "features",  # 2: compiled NHWC GroupNorm
              "SD-VAE f16d32 posterior samples of every image and its h-flip (Zarr).",
              inputs={"shards_url": "imagenet_shards"}),
    StageSpec("dinov2_features", "sfd_core.extract_features", "1", "features",
              "DINOv2-B/14-reg patch tokens at 224 of every image and its h-flip (Zarr, fp16).",
              inputs={"shards_url": "imagenet_shards"}),
    StageSpec("semvae", "sfd_core.train_semvae", "1", "semantic",
              "Semantic VAE (768 -> 16 channels) trained on the DINOv2 features.",
              inputs={"features_url": "dinov2_features"}),
    StageSpec("semantic_latents", "sfd_core.semantic_latents", "1", "semantic",
              "SemVAE posterior samples of the DINOv2 features, with per-channel stats (Zarr).",
              inputs={"features_url": "dinov2_features", "semvae_url": "semvae"}),
    StageSpec("fid_reference", "sfd_core.fid", "1", "eval",
              "Inception statistics of the real images (or an imported ADM reference batch).",
              inputs={"shards_url": "imagenet_shards"}),
    StageSpec("sfd_model", "sfd_core.train_sfd", "1", "train",
              "SFD LightningDiT trained on [texture | semantic] latents with REPA (checkpoints, EMA, resume).",
              inputs={"texture_url": "texture_latents", "semantic_url": "semantic_latents",
                      "dino_url": "dinov2_features"}),
    StageSpec("autoguidance_model", "sfd_core.train_sfd", "1", "train",
              "The small SFD model used as the AutoGuidance 'bad' model.",
              inputs={"texture_url": "texture_latents", "semantic_url": "semantic_latents",
                      "dino_url": "dinov2_features"}),
    StageSpec("sfd_samples", "sfd_core.generate", "1", "eval",
              "Three-phase semantic-first sampling, texture channels decoded to images, sample grid.",
              inputs={"model_url": "sfd_model", "guidance_model_url": "autoguidance_model",
                      "texture_url": "texture_latents"}),
    StageSpec("fid_report", "sfd_core.fid", "1", "eval",
              "FID / IS / KID / precision / recall of the samples against the reference, with a report.",
              inputs={"samples_url": "sfd_samples", "reference_url": "fid_reference"}),
]}


def upstream_assets(asset: str) -> list[str]:
    """Upstream asset names of ``asset`` in a stable order, each once."""
    return list(dict.fromkeys(STAGES[asset].inputs.values()))

# sfd_samples config field that picks one checkpoint of the sfd_model dir (per-checkpoint evaluation).
CHECKPOINT_FIELD = "checkpoint"
