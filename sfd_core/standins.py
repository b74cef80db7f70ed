"""Deterministic random-init stand-ins for the pretrained networks, written in the real on-disk formats.

The tiny profile and the tests load them through the same loaders as the real weights (``sfd_core.encoders``),
so format handling is exercised end to end. Files are written atomically and reused when a manifest with the
same seed, resolution and format version is present.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from sfd_core.config import ConfigError

STANDINS_VERSION = 1  # bump when an architecture or a file format below changes
MANIFEST = "standins.json"

TEXTURE_VAE_FILE = "texture_vae_f16.ckpt"
TEXTURE_VAE_F8_DIR = "texture_vae_f8"
DINOV2_FILE = "dinov2_reg4_tiny.safetensors"
INCEPTION_FILE = "inception_random.pth"
SEMVAE_OFFICIAL_FILE = "semantic_ae_final.pt"

# Tiny architectures: same layouts as the real networks, widths cut down for CPU speed.
TINY_LDM_ARCH = {"block_out_channels": [32, 32, 64, 64, 64], "layers_per_block": 1, "latent_channels": 8,
                 "norm_num_groups": 8}
TINY_SD_VAE_CONFIG = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "latent_channels": 4,
                      "norm_num_groups": 8, "down_block_types": ["DownEncoderBlock2D"] * 4,
                      "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215}
TINY_DINOV2_ARCH = {"embed_dim": 64, "depth": 2, "num_heads": 2}
TINY_SEMVAE = {"hidden_dim": 64, "depth": 2, "num_heads": 2, "latent_channels": 16}


def _atomic_file(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(str(tmp))
    os.replace(tmp, path)


def _atomic_dir(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _write_texture_vae_ldm(path: Path, seed: int, resolution: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    from sfd_core.encoders.ldm_vae_keys import convert_diffusers_to_ldm_state_dict
    from sfd_core.encoders.texture_vae import ldm_autoencoder_config

    arch = {**TINY_LDM_ARCH, "sample_size": resolution}
    torch.manual_seed(seed)
    model = AutoencoderKL(**ldm_autoencoder_config(arch))
    state = convert_diffusers_to_ldm_state_dict(model.state_dict(), len(arch["block_out_channels"]))
    # Real LDM checkpoints carry the discriminator/LPIPS under loss.*; the loader must drop it.
    state["loss.logvar"] = torch.zeros(())
    _atomic_file(path, lambda tmp: torch.save({"state_dict": state, "global_step": 0}, tmp))
    return {"kind": "ldm_f16d32", "path": str(path), "arch": arch}


def _write_texture_vae_f8(path: Path, seed: int, resolution: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**TINY_SD_VAE_CONFIG, sample_size=resolution)
    _atomic_dir(path, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))
    return {"kind": "diffusers", "path": str(path)}


def _write_dinov2(path: Path, seed: int, resolution: int) -> dict[str, Any]:
    import timm
    from safetensors.torch import save_file

    from sfd_core.encoders.dinov2 import DINOV2_MODEL_NAME

    img_size = 14 * (resolution // 16)  # same token grid as the f16 texture latent
    torch.manual_seed(seed)
    vit = timm.create_model(DINOV2_MODEL_NAME, pretrained=False, num_classes=0, img_size=img_size,
                            **TINY_DINOV2_ARCH)
    with torch.no_grad():
        # timm starts LayerScale at 1e-5 and cls/register tokens near 0, which makes blocks no-ops and prefix
        # tokens indistinguishable; a stand-in should mix tokens like a trained network does.
        for name, p in vit.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(1.0)
            elif name in ("cls_token", "reg_token"):
                p.normal_(0.0, 1.0)
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    _atomic_file(path, lambda tmp: save_file(state, tmp))
    return {"path": str(path), "model_name": DINOV2_MODEL_NAME, "img_size": img_size, "arch": dict(TINY_DINOV2_ARCH)}


def _write_semvae_official(path: Path, seed: int, resolution: int) -> str:
    """An official-format ``semantic_ae_final.pt`` (SPEC §1.2) over the stand-in DINOv2 features."""
    from sfd_core.semvae import SemVAE

    torch.manual_seed(seed)
    model = SemVAE(input_dim=TINY_DINOV2_ARCH["embed_dim"], hidden_dim=TINY_SEMVAE["hidden_dim"],
                   depth=TINY_SEMVAE["depth"], num_heads=TINY_SEMVAE["num_heads"],
                   latent_channels=TINY_SEMVAE["latent_channels"], grid=resolution // 16)
    # The official training script stores its YAML config as a string; the loader reads the head count from it.
    config = (f"model:\n  variational: true\n  bottleneck_dim: {TINY_SEMVAE['latent_channels']}\n"
              f"  arch: transformer\n  params:\n    hidden_dim: {TINY_SEMVAE['hidden_dim']}\n"
              f"    transformer_heads: {TINY_SEMVAE['num_heads']}\n    transformer_blocks: {TINY_SEMVAE['depth']}\n")
    ckpt = {"model_state_dict": model.state_dict(), "optimizer_state_dict": {}, "scheduler_state_dict": {},
            "iteration": 0, "loss": 0.0, "loss_averages": {}, "config": config,
            "input_dim": TINY_DINOV2_ARCH["embed_dim"], "bottleneck_dim": TINY_SEMVAE["latent_channels"]}
    _atomic_file(path, lambda tmp: torch.save(ckpt, tmp))
    return str(path)


def _write_inception(path: Path, seed: int) -> str:
    from sfd_core.encoders.inception import random_inception_state_dict

    state = random_inception_state_dict(seed)
    _atomic_file(path, lambda tmp: torch.save(state, tmp))
    return str(path)


def _manifest_matches(manifest_path: Path, wanted: dict[str, Any]) -> bool:
    try:
        found = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return False
    return all(found.get(k) == v for k, v in wanted.items())


def standin_specs(directory: str | os.PathLike, resolution: int) -> dict[str, Any]:
    """The loader specs of the stand-ins in ``directory`` (paths only; does not check or write files)."""
    d = Path(directory).resolve()
    return {
        "texture_vae": {"kind": "ldm_f16d32", "path": str(d / TEXTURE_VAE_FILE),
                        "arch": {**TINY_LDM_ARCH, "sample_size": resolution}},
        "texture_vae_f8": {"kind": "diffusers", "path": str(d / TEXTURE_VAE_F8_DIR)},
        "dinov2": {"path": str(d / DINOV2_FILE), "model_name": "vit_base_patch14_reg4_dinov2",
                   "img_size": 14 * (resolution // 16), "arch": dict(TINY_DINOV2_ARCH)},
        "inception": str(d / INCEPTION_FILE),
        "semvae_official": str(d / SEMVAE_OFFICIAL_FILE),
    }


def make_standins(directory: str | os.PathLike, seed: int = 0, resolution: int = 64) -> dict[str, Any]:
    """Write (or reuse) the stand-ins under ``directory`` and return loader specs:
    {"texture_vae": LDM .ckpt spec, "texture_vae_f8": diffusers folder spec, "dinov2": timm safetensors spec,
    "inception": torch-fidelity weights path, "semvae_official": official-format SemVAE ``.pt`` path (over the
    stand-in DINOv2's features)}. Deterministic in ``seed``; ``resolution`` must be a multiple of 16."""
    if resolution <= 0 or resolution % 16:
        raise ConfigError(f"standins.resolution: expected a positive multiple of 16, got {resolution}")
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    wanted = {"version": STANDINS_VERSION, "seed": int(seed), "resolution": int(resolution)}
    specs = standin_specs(d, resolution)
    files = [d / TEXTURE_VAE_FILE, d / TEXTURE_VAE_F8_DIR, d / DINOV2_FILE, d / INCEPTION_FILE,
             d / SEMVAE_OFFICIAL_FILE]
    if _manifest_matches(d / MANIFEST, wanted) and all(f.exists() for f in files):
        return specs
    (d / MANIFEST).unlink(missing_ok=True)  # files change below; a stale manifest must not vouch for them
    # Separate seeds per network so adding one never changes the others; global RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        _write_texture_vae_ldm(d / TEXTURE_VAE_FILE, seed, resolution)
        _write_texture_vae_f8(d / TEXTURE_VAE_F8_DIR, seed + 1, resolution)
        _write_dinov2(d / DINOV2_FILE, seed + 2, resolution)
        _write_semvae_official(d / SEMVAE_OFFICIAL_FILE, seed + 4, resolution)
    _write_inception(d / INCEPTION_FILE, seed + 3)
    _atomic_file(d / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps({**wanted, "specs": specs}, indent=2)))
    return specs
