"""``sfd::swiglu``: ``silu(gate) * value`` from the [gate | value] projection [..., 2F], and its backward.

The backward reads gate, value and the output gradient once and writes both halves of the input gradient in
place; Inductor's lowering of ``chunk`` + ``silu`` backward builds the same tensor through a masked
concatenation that runs at about half the memory bandwidth (the largest elementwise kernel of the XL/1 step).
Rounding follows the module: silu rounded to the activation dtype, then the product rounded.
"""
from __future__ import annotations

import torch

from sfd_core.kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_tile(h_ptr, rows, F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        """This program's tile: offsets of the gate half in h [rows, 2F] (value = +F) and in [rows, F], the mask,
        gate and value in fp32."""
        m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (m < rows)[:, None] & (f < F)[None, :]
        src = m[:, None] * (2 * F) + f[None, :]
        gate = tl.load(h_ptr + src, mask=mask, other=0.0).to(tl.float32)
        value = tl.load(h_ptr + src + F, mask=mask, other=0.0).to(tl.float32)
        return src, m[:, None] * F + f[None, :], mask, gate, value

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, out_ptr, rows, F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        dtype = h_ptr.dtype.element_ty
        src, dst, mask, gate, value = _load_tile(h_ptr, rows, F, BLOCK_M, BLOCK_F)
        silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        tl.store(out_ptr + dst, (silu * value).to(dtype), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(grad_ptr, h_ptr, dh_ptr, rows, F: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_F: tl.constexpr):
        dtype = dh_ptr.dtype.element_ty
        src, dst, mask, gate, value = _load_tile(h_ptr, rows, F, BLOCK_M, BLOCK_F)
        grad = tl.load(grad_ptr + dst, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = (gate * sig).to(dtype).to(tl.float32)
        d_gate = grad * value * sig * (1.0 + gate * (1.0 - sig))
        tl.store(dh_ptr + src, d_gate.to(dtype), mask=mask)
        tl.store(dh_ptr + src + F, (grad * silu).to(dtype), mask=mask)

# (rows per program, columns per program, warps), measured on an H200 at XL/1 shapes with benchmarks/kernels.py
CONFIG = (4, 512, 4)


def _launch(kernel, *args, rows: int, hidden: int) -> None:
    block_m, block_f, warps = CONFIG
    grid = (triton.cdiv(rows, block_m), triton.cdiv(hidden, block_f))
    kernel[grid](*args, rows, F=hidden, BLOCK_M=block_m, BLOCK_F=block_f, num_warps=warps)


@torch.library.custom_op("sfd::swiglu", mutates_args=())
def swiglu(h: torch.Tensor) -> torch.Tensor:
    """[..., 2F] = [gate | value] -> silu(gate) * value [..., F]."""
    hidden = h.shape[-1] // 2
    h = h.contiguous()
    out = h.new_empty(*h.shape[:-1], hidden)
    rows = h.numel() // (2 * hidden)
    _launch(_swiglu_fwd_kernel, h, out, rows=rows, hidden=hidden)
    return out


@swiglu.register_fake
def _(h):
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


@torch.library.custom_op("sfd::swiglu_backward", mutates_args=())
def swiglu_backward(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    hidden = h.shape[-1] // 2
    h = h.contiguous()
    dh = torch.empty_like(h)
    rows = h.numel() // (2 * hidden)
    _launch(_swiglu_bwd_kernel, grad.contiguous(), h, dh, rows=rows, hidden=hidden)
    return dh


@swiglu_backward.register_fake
def _(grad, h):
    return torch.empty_like(h)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    return swiglu_backward(grad, ctx.saved_tensors[0])


swiglu.register_autograd(_backward, setup_context=_setup_context)
