"""DINOv2 ViT-B/14 with 4 registers (timm ``vit_base_patch14_reg4_dinov2``) as a patch-token encoder (SPEC §1.1).

Weights come from a local timm/HF ``.safetensors`` or Meta's original ``.pth`` (timm converts register tokens
and the class position embedding). Both official preprocessing paths are here: the SemVAE training features
(PIL resize 256 / center crop 224) and the diffusion-latent path (ADM crop in [-1, 1] -> bicubic resize).
timm and torchvision are imported lazily.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sfd_core.config import ConfigError
from sfd_core.encoders.weights import resolve_weights

DINOV2_MODEL_NAME = "vit_base_patch14_reg4_dinov2"
DINOV2_HF_REPO = "timm/vit_base_patch14_reg4_dinov2.lvd142m"
DINOV2_HF_FILENAME = "model.safetensors"
DINOV2_IMG_SIZE = 224  # 16x16 patch grid (SPEC §1.1)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPEC_KEYS = {"path", "model_name", "hf_repo", "hf_filename", "img_size", "arch", "allow_download", "config_field"}
ARCH_KEYS = {"embed_dim", "depth", "num_heads"}


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """x in [0, 1], channels on dim -3 -> ImageNet-normalized."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def preprocess_semvae_train(pil_image, size: int = DINOV2_IMG_SIZE) -> torch.Tensor:
    """SemVAE-training path: Resize(short side 256, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize -> [3,S,S].

    For other sizes the resize keeps the official 256/224 ratio."""
    from torchvision import transforms

    resize = int(round(size * 256 / 224))
    tf = transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
    ])
    return imagenet_normalize(tf(pil_image.convert("RGB")))


def preprocess_from_adm(x: torch.Tensor, size: int = DINOV2_IMG_SIZE) -> torch.Tensor:
    """Diffusion-latent path: NCHW in [-1, 1] (ADM crop) -> (x+1)/2 -> Normalize -> bicubic to size (no antialias)."""
    x = imagenet_normalize((x + 1) / 2)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


class DINOv2Encoder(nn.Module):
    """Patch tokens after the final LayerNorm, class and register tokens dropped. Inference only."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def grid(self) -> int:
        """Patch tokens per side at the model's input size."""
        return int(self.vit.patch_embed.grid_size[0])

    @property
    def img_size(self) -> int:
        return self.patch_size * self.grid

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    @torch.no_grad()
    def patch_tokens(self, x_normalized: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalized NCHW at ``img_size`` -> [B, grid*grid, D] (row-major h*grid+w)."""
        p = next(self.vit.parameters())
        tokens = self.vit.forward_features(x_normalized.to(device=p.device, dtype=p.dtype))
        return tokens[:, self.num_prefix_tokens:]

    @torch.no_grad()
    def features_from_adm(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW in [-1, 1] -> [B, D, grid, grid] (tokens ``b (h w) d -> b d h w``)."""
        tokens = self.patch_tokens(preprocess_from_adm(x, self.img_size))
        b, n, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, self.grid, self.grid)


def load_dinov2(spec: dict[str, Any]) -> DINOv2Encoder:
    """Build a ``DINOv2Encoder`` from a spec: {"path" (.safetensors or Meta .pth), "model_name", "hf_repo",
    "hf_filename", "img_size" (224), "arch" (embed_dim, depth, num_heads for stand-ins), "allow_download",
    "config_field"}. fp32 on CPU; move with ``.to``."""
    import timm

    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"dinov2 spec: unknown key(s) {sorted(unknown)}; valid: {sorted(SPEC_KEYS)}")
    arch = dict(spec.get("arch") or {})
    if set(arch) - ARCH_KEYS:
        raise ConfigError(f"dinov2.arch: unknown key(s) {sorted(set(arch) - ARCH_KEYS)}; valid: {sorted(ARCH_KEYS)}")
    path = resolve_weights(
        "dinov2",
        local_path=spec.get("path"),
        hf_repo=spec.get("hf_repo", DINOV2_HF_REPO),
        hf_filename=spec.get("hf_filename", DINOV2_HF_FILENAME),
        expected="DINOv2 ViT-B/14-reg4 weights: timm model.safetensors or Meta dinov2_vitb14_reg4_pretrain.pth",
        config_field=spec.get("config_field", "dinov2.path"),
        allow_download=bool(spec.get("allow_download", False)),
    )
    # An explicit file means timm never contacts the hub; its loader also converts Meta checkpoints.
    vit = timm.create_model(
        spec.get("model_name", DINOV2_MODEL_NAME),
        pretrained=True,
        pretrained_cfg_overlay=dict(file=path),
        num_classes=0,
        img_size=int(spec.get("img_size", DINOV2_IMG_SIZE)),
        **arch,
    )
    return DINOv2Encoder(vit)
