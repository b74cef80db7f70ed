"""Semantic VAE: compresses DINOv2 patch tokens [B, N, D] to a [B, C, h, w] latent and back (SPEC 1.2-1.3).

Module layout equals the official ``SemanticVariationalAutoEncoder(arch='transformer')`` so that
``semantic_ae_final.pt`` loads strictly: ``encoder``/``decoder`` are nn.Sequential of
Linear, ``depth`` x TransformerBlock, LayerNorm, Linear. There is no positional embedding.
"""
from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sfd_core.checkpoints import (apply_state_dict, extract_state_dict, load_checkpoint_object,
                                  read_weights_metadata, save_weights)

LOGVAR_RANGE = (-30.0, 20.0)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + MHA(LN(x))`` then ``x + MLP(LN(x))`` with an exact-GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def _stack(in_dim: int, hidden_dim: int, out_dim: int, depth: int, num_heads: int, mlp_ratio: float):
    return nn.Sequential(nn.Linear(in_dim, hidden_dim),
                         *(TransformerBlock(hidden_dim, num_heads, mlp_ratio) for _ in range(depth)),
                         nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, out_dim))


class SemVAE(nn.Module):
    def __init__(self, input_dim: int = 768, hidden_dim: int = 768, depth: int = 4, num_heads: int = 6,
                 mlp_ratio: float = 4.0, latent_channels: int = 16, grid: int = 16):
        super().__init__()
        self.config = dict(input_dim=input_dim, hidden_dim=hidden_dim, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, latent_channels=latent_channels, grid=grid)
        self.latent_channels = latent_channels
        self.grid = grid
        # The encoder emits mean ‖ logvar per token.
        self.encoder = _stack(input_dim, hidden_dim, 2 * latent_channels, depth, num_heads, mlp_ratio)
        self.decoder = _stack(latent_channels, hidden_dim, input_dim, depth, num_heads, mlp_ratio)

    def _tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, n, channels = tokens.shape
        if n != self.grid * self.grid:
            raise ValueError(f"SemVAE expects {self.grid}x{self.grid}={self.grid ** 2} tokens, got {n}")
        return tokens.transpose(1, 2).reshape(batch, channels, self.grid, self.grid)  # b (h w) c -> b c h w

    def encode_posterior(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, D] -> (mean, logvar), each [B, C, h, w]; logvar clamped to [-30, 20]."""
        moments = self._tokens_to_grid(self.encoder(features))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    @staticmethod
    def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def encode(self, features: torch.Tensor, sample: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, N, D] -> latent [B, C, h, w]: a posterior sample (official behaviour) or the mean."""
        mean, logvar = self.encode_posterior(features)
        return self.sample_posterior(mean, logvar, generator) if sample else mean

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> reconstructed features [B, h*w, D]."""
        return self.decoder(latent.flatten(2).transpose(1, 2))

    def forward(self, features: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: (reconstruction [B, N, D], mean, logvar)."""
        mean, logvar = self.encode_posterior(features)
        return self.decode(self.sample_posterior(mean, logvar, generator)), mean, logvar


def semvae_loss(recon: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                cos_mode: str = "token_axis", kl_weight: float = 1e-7, mse_weight: float = 1.0,
                cos_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Official SemVAE objective (SPEC 1.3): ``mse_w * mse + cos_w * (1 - cos) + kl_w * kl``.

    ``cos_mode="token_axis"`` reproduces the official code (cosine over the token axis, dim=1, per feature
    channel); ``"per_token"`` is the paper's per-token feature cosine. KL is summed over C, h, w, averaged over B.
    """
    if cos_mode not in ("token_axis", "per_token"):
        raise ValueError(f"cos_mode must be 'token_axis' or 'per_token', got {cos_mode!r}")
    mse = F.mse_loss(recon, target)
    cos = 1 - F.cosine_similarity(recon, target, dim=1 if cos_mode == "token_axis" else -1).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    loss = mse_weight * mse + cos_weight * cos + kl_weight * kl
    return {"loss": loss, "mse": mse, "cos": cos, "kl": kl}


def _heads_from_official_config(config: Any) -> int | None:
    """``transformer_heads`` from the YAML string stored in an official SemVAE checkpoint."""
    if not isinstance(config, str):
        return None
    import yaml

    try:
        parsed = yaml.safe_load(config) or {}
        return int(parsed["model"]["params"]["transformer_heads"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def semvae_config_from_state_dict(state_dict: dict[str, torch.Tensor], num_heads: int = 6, grid: int = 16) -> dict:
    """Architecture from tensor shapes; heads and grid cannot be read from shapes and are passed in."""
    hidden_dim, input_dim = state_dict["encoder.0.weight"].shape
    depth = sum(1 for k in state_dict if k.startswith("encoder.") and k.endswith(".attn.in_proj_weight"))
    mlp_hidden = state_dict["encoder.1.mlp.0.weight"].shape[0] if depth else 4 * hidden_dim
    latent_channels = state_dict["decoder.0.weight"].shape[1]
    return dict(input_dim=int(input_dim), hidden_dim=int(hidden_dim), depth=depth, num_heads=num_heads,
                mlp_ratio=mlp_hidden / hidden_dim, latent_channels=int(latent_channels), grid=grid)


def load_semvae(path: str, grid: int = 16) -> SemVAE:
    """Build and strictly load a SemVAE from the official ``semantic_ae_final.pt`` or from our safetensors
    (written by ``save_semvae``, which stores the architecture in the metadata)."""
    obj = load_checkpoint_object(path)
    state_dict = extract_state_dict(obj, source=str(path))
    if str(path).endswith(".safetensors") and "semvae_config" in (meta := read_weights_metadata(path)):
        config = json.loads(meta["semvae_config"])
    else:
        heads = _heads_from_official_config(obj.get("config")) if "model_state_dict" in obj else None
        config = semvae_config_from_state_dict(state_dict, num_heads=heads or 6, grid=grid)
    return apply_state_dict(SemVAE(**config), state_dict, source=str(path))


def save_semvae(model: SemVAE, path: str, metadata: dict | None = None) -> None:
    """Safetensors weights with the architecture in the metadata, so ``load_semvae`` can rebuild it."""
    save_weights(model, path, metadata={**(metadata or {}), "semvae_config": model.config})
