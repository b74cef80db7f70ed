"""Fused Triton kernels for the GPU training step, exposed as ``torch.library`` custom ops with autograd.

Each op replaces a chain of memory-bound elementwise/reduction work around the matmuls that ``torch.compile``
lowers to several slow kernels (profiled in benchmarks/RESULTS.md):

- ``qkv_norm_rope``: split the fused qkv projection (optionally adding its bias), QK RMSNorm + 2-D RoPE on q and
  k, v copied, all in the [B, N, H, D] layout SDPA reads; its backward writes the whole qkv gradient in one pass
  and returns the bias gradient from per-program partial sums.
- ``norm_modulate`` / ``residual_norm_modulate``: the adaLN sublayer input ``RMSNorm(x) (1 + scale) + shift``,
  optionally after the previous sublayer's gated residual (with that branch's linear bias); the backward's row
  kernel writes the stream gradients, and one more pass takes the per-image token sums from which the shift,
  scale, gate, norm-weight and branch-bias gradients follow.
- ``swiglu``: ``silu(gate) * value`` from the [gate | value] projection (optionally adding its bias), with a
  one-pass backward that also returns the bias gradient.

``adamw_ema`` (not a model op) is the optimizer's AdamW + EMA update in one launch, used by ``sfd_core.optim``.

The ops are opaque to Inductor (a launch or two each way, CUDA-graph safe). Their numerics follow the unfused
modules, including the bf16 roundings between steps, so a fused model matches the stock one to bf16 precision
(the bias of a linear layer is added after its product is rounded, and the gradients that come from token sums
are summed in fp32 without the forward's intermediate roundings). ``LightningDiT(fused_kernels=True)`` uses
them on CUDA tensors (or a subset: ``fused_kernels=["swiglu"]``, names in ``FUSED_OPS``); elsewhere it runs the
stock modules. With ``TRITON_INTERPRET=1`` set before import, the kernels also run on CPU tensors (how the CPU
tests check them).
"""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    TRITON_AVAILABLE = True
except ImportError:  # CPU-only installs: the model falls back to its stock modules
    TRITON_AVAILABLE = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


FUSED_OPS = ("norm_modulate", "qkv_norm_rope", "swiglu")


def fused_op_names(fused_kernels) -> frozenset[str]:
    """``fused_kernels`` as given to the model (True: all, False/None: none, or names from FUSED_OPS) -> names."""
    if fused_kernels is True:
        return frozenset(FUSED_OPS)
    if not fused_kernels:
        return frozenset()
    names = frozenset([fused_kernels] if isinstance(fused_kernels, str) else fused_kernels)
    unknown = names - set(FUSED_OPS)
    if unknown:
        raise ValueError(f"unknown fused kernels {sorted(unknown)}; choose from {list(FUSED_OPS)}")
    return names


def kernels_run_on(tensor) -> bool:
    """Whether the fused ops can run on ``tensor``'s device: CUDA with Triton, or any device in interpreter mode."""
    return TRITON_AVAILABLE and (tensor.is_cuda or INTERPRET)
