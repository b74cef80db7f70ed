"""Texture VAE: the LDM f16d32 autoencoder of SFD (SPEC §2.1) or a diffusers f8 SD-VAE (SPEC §2.2).

Both load into diffusers ``AutoencoderKL`` behind one wrapper, ``TextureVAE``, whose latents are already scaled
(x ``scaling_factor``; 1.0 for f16d32, 0.18215 for SD-VAE) and whose decoder emits uint8 exactly like the
official code. diffusers is imported lazily.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from sfd_core.config import ConfigError
from sfd_core.encoders.ldm_vae_keys import convert_ldm_vae_state_dict
from sfd_core.encoders.weights import resolve_weights
from sfd_core.reporting import log

KINDS = ("ldm_f16d32", "diffusers")
SPEC_KEYS = {"kind", "path", "hf_repo", "hf_filename", "arch", "allow_download", "config_field", "channels_last"}

# SPEC §2.1: the f16d32 LDM autoencoder used by SFD and where its checkpoint lives on the hub.
LDM_F16D32_ARCH: dict[str, Any] = {
    "block_out_channels": [128, 128, 256, 256, 512],
    "layers_per_block": 2,
    "latent_channels": 32,
    "norm_num_groups": 32,
    "sample_size": 256,
}
LDM_F16D32_HF_REPO = "hustvl/va-vae-imagenet256-experimental-variants"
LDM_F16D32_HF_FILENAME = "ldm-imagenet256-f16d32-50ep.ckpt"
SD_VAE_HF_REPO = "stabilityai/sd-vae-ft-ema"


def ldm_autoencoder_config(arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` kwargs for the LDM layout: attention only in the deepest level, scaling 1.0."""
    unknown = set(arch or {}) - set(LDM_F16D32_ARCH)
    if unknown:
        raise ConfigError(f"texture_vae.arch: unknown key(s) {sorted(unknown)}; valid: {sorted(LDM_F16D32_ARCH)}")
    a = {**LDM_F16D32_ARCH, **(arch or {})}
    levels = len(a["block_out_channels"])
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * (levels - 1) + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (levels - 1),
        "block_out_channels": list(a["block_out_channels"]),
        "layers_per_block": int(a["layers_per_block"]),
        "act_fn": "silu",
        "latent_channels": int(a["latent_channels"]),
        "norm_num_groups": int(a["norm_num_groups"]),
        "sample_size": int(a["sample_size"]),
        "scaling_factor": 1.0,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


def load_ldm_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an LDM ``.ckpt`` (or a bare state dict), on CPU."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # Lightning checkpoints may pickle non-tensor objects (hyper-parameters, callbacks)
        log(f"texture_vae: {path} is not a plain tensor pickle ({type(err).__name__}); loading it with full unpickling")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with 'state_dict' (LDM checkpoint), got {type(ckpt).__name__}")
    return state


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """NCHW float images in [-1, 1] -> NHWC uint8 as in the official code: clamp(127.5 x + 128, 0, 255), truncated."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class TextureVAE(nn.Module):
    """A diffusers ``AutoencoderKL`` with scaled latents and the official uint8 decode. Inference only."""

    def __init__(self, autoencoder: nn.Module, kind: str, channels_last: bool = False):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.kind = kind
        self.channels_last = channels_last
        if channels_last:
            self.autoencoder.to(memory_format=torch.channels_last)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.autoencoder.config.scaling_factor)

    def _param(self) -> torch.Tensor:
        return next(self.autoencoder.parameters())

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        p = self._param()
        x = x.to(device=p.device, dtype=p.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: NCHW in [-1, 1] -> scaled latent: posterior sample (mean + std * eps) or, with sample=False, the mean."""
        dist = self.autoencoder.encode(self._prepare(x)).latent_dist
        z = dist.mean
        if sample:
            # Draw on the generator's device so a CPU generator reproduces the same noise for any model device.
            gen_device = generator.device if generator is not None else z.device
            eps = torch.randn(z.shape, generator=generator, device=gen_device, dtype=z.dtype).to(z.device)
            z = z + dist.std * eps
        return z * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> NCHW float image (nominally [-1, 1], not clamped)."""
        return self.autoencoder.decode(self._prepare(z) / self.scaling_factor).sample

    @torch.no_grad()
    def decode_to_uint8(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> NHWC uint8 image."""
        return images_to_uint8(self.decode(z))


def _check_spec(spec: dict[str, Any]) -> str:
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"texture_vae spec: unknown key(s) {sorted(unknown)}; valid: {sorted(SPEC_KEYS)}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"texture_vae.kind: expected one of {KINDS}, got {kind!r}")
    return kind


def _load_ldm(spec: dict[str, Any]) -> nn.Module:
    from diffusers import AutoencoderKL

    path = resolve_weights(
        "texture_vae",
        local_path=spec.get("path"),
        hf_repo=spec.get("hf_repo", LDM_F16D32_HF_REPO),
        hf_filename=spec.get("hf_filename", LDM_F16D32_HF_FILENAME),
        expected=f"an LDM autoencoder checkpoint such as {LDM_F16D32_HF_FILENAME} (dict with 'state_dict')",
        config_field=spec.get("config_field", "texture_vae.path"),
        allow_download=bool(spec.get("allow_download", False)),
    )
    config = ldm_autoencoder_config(spec.get("arch"))
    model = AutoencoderKL(**config)
    state = convert_ldm_vae_state_dict(load_ldm_state_dict(path), len(config["block_out_channels"]))
    model.load_state_dict(state, strict=True)
    return model


def _load_diffusers(spec: dict[str, Any]) -> nn.Module:
    from diffusers import AutoencoderKL

    if spec.get("arch"):
        raise ConfigError("texture_vae.arch applies to kind 'ldm_f16d32' only; a diffusers folder has config.json")
    folder = resolve_weights(
        "texture_vae",
        local_path=spec.get("path"),
        hf_repo=spec.get("hf_repo", SD_VAE_HF_REPO),
        hf_filename=None,
        expected="a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)",
        config_field=spec.get("config_field", "texture_vae.path"),
        allow_download=bool(spec.get("allow_download", False)),
    )
    # A full pipeline folder keeps the VAE in vae/.
    subfolder = "vae" if not os.path.exists(os.path.join(folder, "config.json")) and os.path.isdir(
        os.path.join(folder, "vae")) else None
    return AutoencoderKL.from_pretrained(folder, subfolder=subfolder, local_files_only=True,
                                         low_cpu_mem_usage=False)  # no accelerate; avoids its warning


def load_texture_vae(spec: dict[str, Any]) -> TextureVAE:
    """Build a ``TextureVAE`` from a spec: {"kind": "ldm_f16d32"|"diffusers", "path", "hf_repo", "hf_filename",
    "arch" (ldm only: block_out_channels, layers_per_block, latent_channels, norm_num_groups, sample_size),
    "allow_download", "config_field", "channels_last"}. Weights are fp32 on CPU; move with ``.to``."""
    kind = _check_spec(spec)
    autoencoder = _load_ldm(spec) if kind == "ldm_f16d32" else _load_diffusers(spec)
    return TextureVAE(autoencoder, kind, channels_last=bool(spec.get("channels_last", False)))
