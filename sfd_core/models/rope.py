"""2-D rotary position embedding for square token grids (EVA-02 ``VisionRotaryEmbeddingFast`` layout).

The head dimension is split in two halves: the first half rotates with the token's row index, the second half
with its column index. Within each half, channels form interleaved pairs (2i, 2i+1) that share one frequency.
"""
from __future__ import annotations

import torch
from torch import nn


def rotate_interleaved_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the 90-degree rotation of each adjacent pair."""
    pairs = x.unflatten(-1, (-1, 2))
    first, second = pairs.unbind(-1)
    return torch.stack((-second, first), dim=-1).flatten(-2)


def rope_2d_angles(head_dim: int, grid_size: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles [grid_size**2, head_dim] for row-major tokens (index h * grid_size + w)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float32)[: axis_dim // 2] / axis_dim
    inv_freq = 1.0 / (theta ** exponents)                                   # [head_dim / 4]
    positions = torch.arange(grid_size, dtype=torch.float32)
    axis_angles = (positions[:, None] * inv_freq[None, :]).repeat_interleave(2, dim=-1)  # [grid, head_dim / 2]
    rows = axis_angles[:, None, :].expand(grid_size, grid_size, axis_dim)
    cols = axis_angles[None, :, :].expand(grid_size, grid_size, axis_dim)
    return torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)


class VisionRotaryEmbeddingFast(nn.Module):
    """Applies 2-D RoPE to [..., N_tokens, head_dim] tensors.

    ``freqs_cos`` / ``freqs_sin`` are persistent buffers because the official checkpoints contain them.
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        angles = rope_2d_angles(head_dim, grid_size, theta)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Rotate in fp32 (the buffers' dtype) and return the input dtype, so bf16 activations stay bf16.
        x32 = x.float()
        return (x32 * self.freqs_cos + rotate_interleaved_pairs(x32) * self.freqs_sin).type_as(x)
