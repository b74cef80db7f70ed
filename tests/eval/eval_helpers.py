"""Helpers of the eval tests: a tiny SFD model in a fake sfd_model stage, real-ish images.

The tiny texture-VAE stand-in is f16 with 8 latent channels, so 64 px images come from 4x4 latents; the tiny
LightningDiT gets 8 texture + 4 semantic channels at 4x4 to match.
"""
from __future__ import annotations

import numpy as np
import torch

from sfd_core.checkpoints import save_weights
from sfd_core.models import build_model
from storage.manifest import write_success

RESOLUTION = 64
TEXTURE_CHANNELS = 8
SEMANTIC_CHANNELS = 4
TINY_OVERRIDES = {"in_channels": TEXTURE_CHANNELS + SEMANTIC_CHANNELS, "semantic_channels": SEMANTIC_CHANNELS,
                  "input_size": RESOLUTION // 16, "num_classes": 10}


def tiny_model_weights(path, seed: int) -> str:
    """A LightningDiT-tiny/1 with every weight perturbed (the default init zeroes the output layer, which would
    make the sampler return its noise unchanged), saved with ``save_weights``."""
    torch.manual_seed(seed)
    model = build_model("LightningDiT-tiny/1", **TINY_OVERRIDES)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_weights(model, str(path))
    return str(path)


def fake_model_stage(directory, weights: str, fingerprint: str) -> str:
    """A stage dir whose manifest looks like the training program's (the contract generate reads)."""
    out = str(directory / fingerprint)
    rng = np.random.default_rng(0)
    write_success(out, {
        "stage": "sfd_model", "fingerprint": fingerprint, "uri": out, "standins": True,
        "artifacts": {"checkpoint": out, "ema": weights},
        "model": {"name": "LightningDiT-tiny/1", "overrides": TINY_OVERRIDES},
        "stats": {"texture": {"mean": rng.normal(0, 0.1, TEXTURE_CHANNELS).tolist(),
                              "std": rng.uniform(0.5, 1.5, TEXTURE_CHANNELS).tolist()}},
        "config": {"delta_t": 0.3, "latent_multiplier": 1.0},
    })
    return out


def smooth_images(count: int, seed: int, size: int = RESOLUTION) -> np.ndarray:
    """uint8 [count, size, size, 3] images with photo-like low-frequency structure (upsampled 8x8 noise)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (count, 3, 8, 8)).astype(np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return fine.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
