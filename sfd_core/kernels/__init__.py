"""Fused Triton kernels for the GPU training step, exposed as ``torch.library`` custom ops with autograd.

Each op replaces a chain of memory-bound elementwise/reduction work around the matmuls that ``torch.compile``
lowers to several slow kernels (profiled in benchmarks/RESULTS.md):

- ``qkv_norm_rope``: split the fused qkv projection, QK RMSNorm + 2-D RoPE on q and k, v copied, all in the
  [B, N, H, D] layout SDPA reads; its backward writes the whole qkv gradient in one pass.
- ``swiglu``: ``silu(gate) * value`` from the [gate | value] projection, with a one-pass backward.

The ops are opaque to Inductor (one launch each, CUDA-graph safe). Their numerics follow the unfused modules,
including the bf16 roundings between steps, so a fused model matches the stock one to bf16 precision.
``LightningDiT(fused_kernels=True)`` uses them on CUDA tensors; elsewhere it runs the stock modules. With
``TRITON_INTERPRET=1`` set before import, the kernels also run on CPU tensors (how the CPU tests check them).
"""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    TRITON_AVAILABLE = True
except ImportError:  # CPU-only installs: the model falls back to its stock modules
    TRITON_AVAILABLE = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernels_run_on(tensor) -> bool:
    """Whether the fused ops can run on ``tensor``'s device: CUDA with Triton, or any device in interpreter mode."""
    return TRITON_AVAILABLE and (tensor.is_cuda or INTERPRET)
