"""Building blocks of LightningDiT: norms, attention, SwiGLU, embedders, fixed position embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sfd_core.kernels import kernels_run_on
from sfd_core.kernels.qkv_norm_rope import qkv_norm_rope
from sfd_core.kernels.swiglu import swiglu
from sfd_core.models.rope import VisionRotaryEmbeddingFast


class RMSNorm(nn.Module):
    """RMS normalisation in fp32 (stable under bf16 autocast), cast back to the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Official order (cast back, then scale by the fp32 weight), rounded to the input dtype: identical in
        # fp32, and under bf16 autocast q/k stay bf16 instead of silently widening to fp32 (half the bytes).
        return (normed.type_as(x) * self.weight).type_as(x)


class SwiGLU(nn.Module):
    """``w3(silu(gate) * value)`` where ``w12`` produces [gate | value] in one matmul. ``fused`` computes the
    middle with the ``sfd::swiglu`` kernel where it can run (``sfd_core.kernels``)."""

    def __init__(self, dim: int, hidden_dim: int, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * value``: the input of ``w3``."""
        if self.fused and kernels_run_on(x):   # w12's bias is added, and its gradient summed, in the kernel
            return swiglu(F.linear(x, self.w12.weight), self.w12.bias)
        gate, value = self.w12(x).chunk(2, dim=-1)
        return F.silu(gate) * value


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, QK RMSNorm and 2-D RoPE, computed by SDPA (flash on GPU).
    ``fused`` does the split, norms and RoPE in the ``sfd::qkv_norm_rope`` kernel where it can run."""

    def __init__(self, dim: int, num_heads: int, fused: bool = False):
        super().__init__()
        self.fused = fused
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: VisionRotaryEmbeddingFast) -> torch.Tensor:
        return self.proj(self.attend(x, rope))

    def attend(self, x: torch.Tensor, rope: VisionRotaryEmbeddingFast) -> torch.Tensor:
        """The heads' outputs [B, N, dim]: the input of ``proj``."""
        batch, tokens, dim = x.shape
        # qkv rows are ordered (3, heads, head_dim), as in the official checkpoints.
        if self.fused and kernels_run_on(x):   # qkv's bias is added, and its gradient summed, in the kernel
            q, k, v = (t.transpose(1, 2) for t in qkv_norm_rope(
                F.linear(x, self.qkv.weight), self.q_norm.weight, self.k_norm.weight, rope.freqs_cos, rope.freqs_sin,
                self.num_heads, self.q_norm.eps, self.qkv.bias))
        else:
            qkv = self.qkv(x)
            q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q = rope(self.q_norm(q))
            k = rope(self.k_norm(k))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, tokens, dim)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (row-major). Stored as a Conv2d (official key ``proj``) but
    computed as one matmul over unfolded patches, which is the same map and faster for 1x1 patches."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        p = self.patch_size
        patches = (x.reshape(batch, channels, height // p, p, width // p, p)
                   .permute(0, 2, 4, 1, 3, 5)
                   .reshape(batch, (height // p) * (width // p), channels * p * p))
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B] times -> [B, dim] as [cos(t f_k) | sin(t f_k)], f_k = exp(-ln(max_period) k / (dim/2)).

    Flow time in [0, 1] is used as is (not scaled by 1000), like the official code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.frequency_dim))


class LabelEmbedder(nn.Module):
    """Class embedding; with dropout > 0 an extra row ``num_classes`` is the null (unconditional) label."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def drop_labels(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class where ``drop`` is true (random with ``dropout_prob`` if not given)."""
        if drop is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop.bool(), torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


def sincos_pos_embed_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[P] -> [P, dim] as [sin(p w_k) | cos(p w_k)], w_k = 10000^(-k / (dim/2)), in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed [grid_size**2, dim] embedding (MAE/DiT recipe): first dim/2 encode the column, last dim/2 the row."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)   # token h * grid + w -> h
    cols = coords.repeat(grid_size)              # -> w
    return torch.cat([sincos_pos_embed_1d(dim // 2, cols), sincos_pos_embed_1d(dim // 2, rows)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
