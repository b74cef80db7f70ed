"""GroupNorm for channels_last activations that compiles to coalesced reductions.

``torch.compile`` lowers ``nn.GroupNorm`` on a channels_last (NHWC in memory) tensor to one reduction per
(image, group) that gathers ``C / G`` adjacent channels at a stride of ``C`` elements: on an H200 the statistics of
the texture VAE's 256x256x128 activations ran ~6x slower than a read of the tensor and took a third of the
encoder's time. Here the statistics are per-channel sums over H x W first (each reduction reads whole
contiguous channel rows, the natural order of NHWC), folded into groups afterwards, with the variance taken
about the group mean in a second pass (two reads, no ``E[x^2] - E[x]^2`` cancellation). Same parameters, same
state-dict keys, the same function as ``nn.GroupNorm`` (statistics in float32, output in the input dtype).
"""
from __future__ import annotations

import torch
from torch import nn


class ChannelsLastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose 4-D channels_last inputs take the per-channel-sum path; others go to the stock op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        n, c, h, w = x.shape
        per_group = c // self.num_groups
        count = per_group * h * w
        x32 = x.float()

        def per_channel(group_values: torch.Tensor) -> torch.Tensor:   # [n, G] -> [n, C, 1, 1]
            return group_values.repeat_interleave(per_group, dim=1).view(n, c, 1, 1)

        mean = per_channel(x32.sum(dim=(2, 3)).view(n, self.num_groups, per_group).sum(-1) / count)
        centred = x32 - mean
        var = centred.square().sum(dim=(2, 3)).view(n, self.num_groups, per_group).sum(-1) / count
        y = centred * per_channel(torch.rsqrt(var + self.eps))
        if self.affine:
            y = y * self.weight.float().view(1, c, 1, 1) + self.bias.float().view(1, c, 1, 1)
        return y.to(x.dtype)


def use_channels_last_group_norm(module: nn.Module) -> int:
    """Swap every ``nn.GroupNorm`` inside ``module`` for ``ChannelsLastGroupNorm`` in place (parameters kept);
    returns how many were swapped."""
    swapped = 0
    for child in module.modules():
        if type(child) is nn.GroupNorm:
            child.__class__ = ChannelsLastGroupNorm
            swapped += 1
    return swapped
