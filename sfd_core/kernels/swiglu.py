"""``sfd::swiglu``: ``silu(gate) * value`` from the [gate | value] projection [..., 2F], and its backward.

The backward reads gate, value and the output gradient once and writes both halves of the input gradient in
place; Inductor's lowering of ``chunk`` + ``silu`` backward builds the same tensor through a masked
concatenation that runs at about half the memory bandwidth (the largest elementwise kernel of the XL/1 step).
Rounding follows the module: silu rounded to the activation dtype, then the product rounded.

With ``bias`` the projection comes without its bias (``F.linear(x, w12.weight)``): the kernel adds it (rounded
to the activation dtype, as the linear layer's output is) and the backward returns its gradient as well, from
per-program column sums of the input gradient it writes anyway. Otherwise autograd would sum that [rows, 2F]
gradient once more in a separate reduction over the rows.
"""
from __future__ import annotations

import torch

from sfd_core.kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_tile(h_ptr, bias_ptr, rows, F: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_F: tl.constexpr):
        """This program's tile: offsets of the gate half in h [rows, 2F] (value = +F) and in [rows, F], the mask,
        gate and value (bias added, rounded to h's dtype) in fp32, and the column index."""
        m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (m < rows)[:, None] & (f < F)[None, :]
        src = m[:, None] * (2 * F) + f[None, :]
        gate = tl.load(h_ptr + src, mask=mask, other=0.0).to(tl.float32)
        value = tl.load(h_ptr + src + F, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dtype = h_ptr.dtype.element_ty
            gate = (gate + tl.load(bias_ptr + f, mask=f < F, other=0.0).to(dtype).to(tl.float32)[None, :])
            value = (value + tl.load(bias_ptr + F + f, mask=f < F, other=0.0).to(dtype).to(tl.float32)[None, :])
            gate, value = gate.to(dtype).to(tl.float32), value.to(dtype).to(tl.float32)
        return src, m[:, None] * F + f[None, :], mask, gate, value, f

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, bias_ptr, out_ptr, rows, F: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        dtype = h_ptr.dtype.element_ty
        src, dst, mask, gate, value, f = _load_tile(h_ptr, bias_ptr, rows, F, HAS_BIAS, BLOCK_M, BLOCK_F)
        silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        tl.store(out_ptr + dst, (silu * value).to(dtype), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(grad_ptr, h_ptr, bias_ptr, dh_ptr, dbias_partial_ptr, rows, F: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        dtype = dh_ptr.dtype.element_ty
        src, dst, mask, gate, value, f = _load_tile(h_ptr, bias_ptr, rows, F, HAS_BIAS, BLOCK_M, BLOCK_F)
        grad = tl.load(grad_ptr + dst, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = (gate * sig).to(dtype).to(tl.float32)
        d_gate = (grad * value * sig * (1.0 + gate * (1.0 - sig))).to(dtype)
        d_value = (grad * silu).to(dtype)
        tl.store(dh_ptr + src, d_gate, mask=mask)
        tl.store(dh_ptr + src + F, d_value, mask=mask)
        if HAS_BIAS:   # this program's column sums of the gradient as written (masked rows are zeros)
            partial = dbias_partial_ptr + tl.program_id(0).to(tl.int64) * (2 * F) + f
            tl.store(partial, tl.sum(d_gate.to(tl.float32), axis=0), mask=f < F)
            tl.store(partial + F, tl.sum(d_value.to(tl.float32), axis=0), mask=f < F)

# (rows per program, columns per program, warps). The forward's was measured best on an H200 at XL/1 shapes with
# benchmarks/kernels.py --sweep. The backward's is not measured yet: 32 rows keep the bias partials at 1/16 of the
# gradient's bytes (4 rows, the old kernel's best, would make them half as large as the gradient); sweep it on a GPU.
FORWARD_CONFIG = (4, 512, 4)
BACKWARD_CONFIG = (32, 128, 8)


def _grid(rows: int, hidden: int, config: tuple[int, int, int]) -> tuple[int, int]:
    return triton.cdiv(rows, config[0]), triton.cdiv(hidden, config[1])


def _check(h: torch.Tensor, bias: torch.Tensor | None) -> int:
    if bias is not None and bias.shape != (h.shape[-1],):
        raise ValueError(f"bias must be [{h.shape[-1]}] like h's last dim; got {tuple(bias.shape)}")
    return h.shape[-1] // 2


@torch.library.custom_op("sfd::swiglu", mutates_args=())
def swiglu(h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2F] = [gate | value] (plus ``bias`` [2F], if given) -> silu(gate) * value [..., F]."""
    hidden = _check(h, bias)
    h = h.contiguous()
    out = h.new_empty(*h.shape[:-1], hidden)
    rows = h.numel() // (2 * hidden)
    block_m, block_f, warps = FORWARD_CONFIG
    _swiglu_fwd_kernel[_grid(rows, hidden, FORWARD_CONFIG)](
        h, h if bias is None else bias.contiguous(), out, rows, F=hidden, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_F=block_f, num_warps=warps)
    return out


@swiglu.register_fake
def _(h, bias=None):
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


@torch.library.custom_op("sfd::swiglu_backward", mutates_args=())
def swiglu_backward(grad: torch.Tensor, h: torch.Tensor,
                    bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (d h, per-program partial sums of d h over rows [programs, 2F], empty without ``bias``). The caller sums
    the partials, where Inductor can fuse that sum with the cast to the bias's dtype."""
    hidden = _check(h, bias)
    h = h.contiguous()
    dh = torch.empty_like(h)
    rows = h.numel() // (2 * hidden)
    grid = _grid(rows, hidden, BACKWARD_CONFIG)
    partials = torch.empty(grid[0] if bias is not None else 0, 2 * hidden, device=h.device, dtype=torch.float32)
    block_m, block_f, warps = BACKWARD_CONFIG
    _swiglu_bwd_kernel[grid](grad.contiguous(), h, h if bias is None else bias.contiguous(), dh, partials, rows,
                             F=hidden, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_F=block_f,
                             num_warps=warps)
    return dh, partials


@swiglu_backward.register_fake
def _(grad, h, bias):
    hidden = h.shape[-1] // 2
    programs = _grid(h.numel() // (2 * hidden), hidden, BACKWARD_CONFIG)[0] if bias is not None else 0
    return torch.empty_like(h), h.new_empty(programs, 2 * hidden, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    h, bias = ctx.saved_tensors
    dh, partials = swiglu_backward(grad, h, bias)
    return dh, (partials.sum(0).to(bias.dtype) if bias is not None else None)


swiglu.register_autograd(_backward, setup_context=_setup_context)
