"""``sfd::qkv_norm_rope``: fused qkv split + QK RMSNorm + 2-D RoPE (and its backward) for LightningDiT attention.

Forward, per (token, head) row of the qkv projection [B, N, 3, H, D]: q and k get RMSNorm over D (fp32 statistics,
rounded to the activation dtype, scaled by the fp32 weight, rounded again: the module's order) and then the
interleaved-pair rotation ``y cos + rot(y) sin`` (``sfd_core.models.rope``); v is copied. All three come out as
[B, N, H, D] (SDPA reads them as [B, H, N, D] through a transpose view).

Backward, per row: RoPE's transpose, then RMSNorm's ``dx = r (dn - n mean(dn n))`` with ``n = x r`` recomputed
from qkv (cheaper than storing it), written straight into the [B, N, 3HD] qkv gradient with dv beside it; the
norm weights' gradients are per-program partial sums reduced afterwards.

Without the kernel, Inductor lowers this to separate statistics, rotation, stacking and permute-copy kernels
(about 30 ms of a 246 ms XL/1 step at batch 128 on an H200); the fused pair takes 12 ms (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch

from sfd_core.kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # Rows are loaded whole (coalesced, D padded to a power of two); RoPE's pair rotation is a register
    # reshape [R, D/2, 2] -> split -> join. (Loading even and odd halves with stride 2 instead measured 10x slower.)

    @triton.jit
    def _rotate_pairs(y, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # (y0, y1, y2, y3, ...) -> (-y1, y0, -y3, y2, ...)
        even, odd = tl.split(tl.reshape(y, [BLOCK_R, BLOCK_D // 2, 2]))
        return tl.reshape(tl.join(-odd, even), [BLOCK_R, BLOCK_D])

    @triton.jit
    def _rotate_pairs_transposed(g, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # the transpose of _rotate_pairs: (g0, g1, g2, g3, ...) -> (g1, -g0, g3, -g2, ...)
        even, odd = tl.split(tl.reshape(g, [BLOCK_R, BLOCK_D // 2, 2]))
        return tl.reshape(tl.join(odd, -even), [BLOCK_R, BLOCK_D])

    @triton.jit
    def _row_block(plane, rows, HEADS: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's rows (image, token, head): offsets in qkv (src) and in [B, N, H, D] (dst), the token's
        position in its image (pos), the column index and the mask."""
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        mask = (r < rows)[:, None] & (d < D)[None, :]
        token = r // HEADS
        src = token * (3 * HEADS * D) + plane * (HEADS * D) + (r % HEADS) * D
        return src, r * D, token % TOKENS, d, mask

    @triton.jit
    def _norm_rope_rows(qkv_ptr, out_ptr, w_ptr, cos_ptr, sin_ptr, src, dst, pos, d, mask, eps,
                        D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        dtype = qkv_ptr.dtype.element_ty
        x = tl.load(qkv_ptr + src[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        # the module's RMSNorm: normalise in fp32, round, scale by the fp32 weight, round
        normed = (x * rstd[:, None]).to(dtype).to(tl.float32)
        y = (normed * w[None, :]).to(dtype).to(tl.float32)
        trig = pos[:, None] * D + d[None, :]
        cos = tl.load(cos_ptr + trig, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + trig, mask=mask, other=0.0)
        out = y * cos + _rotate_pairs(y, BLOCK_R, BLOCK_D) * sin
        tl.store(out_ptr + dst[:, None] + d[None, :], out.to(dtype), mask=mask)

    @triton.jit
    def _qkv_norm_rope_fwd_kernel(qkv_ptr, q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, rows, eps,
                                  HEADS: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        plane = tl.program_id(1)   # 0 q, 1 k, 2 v
        src, dst, pos, d, mask = _row_block(plane, rows, HEADS, TOKENS, D, BLOCK_R, BLOCK_D)
        if plane == 0:
            _norm_rope_rows(qkv_ptr, q_ptr, qw_ptr, cos_ptr, sin_ptr, src, dst, pos, d, mask, eps,
                            D, BLOCK_R, BLOCK_D)
        elif plane == 1:
            _norm_rope_rows(qkv_ptr, k_ptr, kw_ptr, cos_ptr, sin_ptr, src, dst, pos, d, mask, eps,
                            D, BLOCK_R, BLOCK_D)
        else:
            v = tl.load(qkv_ptr + src[:, None] + d[None, :], mask=mask)
            tl.store(v_ptr + dst[:, None] + d[None, :], v, mask=mask)

    @triton.jit
    def _norm_rope_rows_backward(qkv_ptr, grad_ptr, dqkv_ptr, w_ptr, cos_ptr, sin_ptr, dw_ptr, src, dst, pos, d,
                                 mask, eps, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        x = tl.load(qkv_ptr + src[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        normed = x * rstd[:, None]
        trig = pos[:, None] * D + d[None, :]
        cos = tl.load(cos_ptr + trig, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + trig, mask=mask, other=0.0)
        g = tl.load(grad_ptr + dst[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        # RoPE transposed, then RMSNorm backward: dx = r (dn - n mean(dn n)), dn = dy w
        dy = g * cos + _rotate_pairs_transposed(g * sin, BLOCK_R, BLOCK_D)
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        dn = dy * w[None, :]
        dx = rstd[:, None] * (dn - normed * (tl.sum(dn * normed, axis=1) / D)[:, None])
        tl.store(dqkv_ptr + src[:, None] + d[None, :], dx.to(dqkv_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + d, tl.sum(dy * normed, axis=0), mask=d < D)   # this program's share of d weight

    @triton.jit
    def _qkv_norm_rope_bwd_kernel(qkv_ptr, dq_ptr, dk_ptr, dv_ptr, dqkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
                                  dw_partial_ptr, rows, eps, HEADS: tl.constexpr, TOKENS: tl.constexpr,
                                  D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        plane = tl.program_id(1)   # 0 q, 1 k, 2 v
        src, dst, pos, d, mask = _row_block(plane, rows, HEADS, TOKENS, D, BLOCK_R, BLOCK_D)
        dw_ptr = dw_partial_ptr + (plane * tl.num_programs(0) + tl.program_id(0)) * D
        if plane == 0:
            _norm_rope_rows_backward(qkv_ptr, dq_ptr, dqkv_ptr, qw_ptr, cos_ptr, sin_ptr, dw_ptr, src, dst, pos, d,
                                     mask, eps, D, BLOCK_R, BLOCK_D)
        elif plane == 1:
            _norm_rope_rows_backward(qkv_ptr, dk_ptr, dqkv_ptr, kw_ptr, cos_ptr, sin_ptr, dw_ptr, src, dst, pos, d,
                                     mask, eps, D, BLOCK_R, BLOCK_D)
        else:
            g = tl.load(dv_ptr + dst[:, None] + d[None, :], mask=mask)
            tl.store(dqkv_ptr + src[:, None] + d[None, :], g.to(dqkv_ptr.dtype.element_ty), mask=mask)

# (rows per program, warps), measured on an H200 at XL/1 shapes with benchmarks/kernels.py
FORWARD_CONFIG = (16, 2)
BACKWARD_CONFIG = (32, 2)


def _shape(qkv: torch.Tensor, num_heads: int) -> tuple[int, int, int, int]:
    batch, tokens, width = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not 3 x {num_heads} heads x head_dim")
    return batch, tokens, num_heads, width // (3 * num_heads)


@torch.library.custom_op("sfd::qkv_norm_rope", mutates_args=())
def qkv_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, num_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, N, 3*H*D] (rows ordered (3, H, D)) -> RoPE(RMSNorm(q)), RoPE(RMSNorm(k)), v, each [B, N, H, D]."""
    batch, tokens, heads, head_dim = _shape(qkv, num_heads)
    qkv = qkv.contiguous()
    q, k, v = (qkv.new_empty(batch, tokens, heads, head_dim) for _ in range(3))
    rows = batch * tokens * heads
    block_rows, warps = FORWARD_CONFIG
    _qkv_norm_rope_fwd_kernel[(triton.cdiv(rows, block_rows), 3)](
        qkv, q, k, v, q_weight.contiguous(), k_weight.contiguous(), cos.float().contiguous(),
        sin.float().contiguous(), rows, eps, HEADS=heads, TOKENS=tokens, D=head_dim, BLOCK_R=block_rows,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=warps)
    return q, k, v


@qkv_norm_rope.register_fake
def _(qkv, q_weight, k_weight, cos, sin, num_heads, eps):
    batch, tokens, heads, head_dim = _shape(qkv, num_heads)
    return tuple(qkv.new_empty(batch, tokens, heads, head_dim) for _ in range(3))


@torch.library.custom_op("sfd::qkv_norm_rope_backward", mutates_args=())
def qkv_norm_rope_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor,
                           q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           num_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``qkv_norm_rope`` -> (d qkv [B, N, 3HD], d q_weight [D], d k_weight [D])."""
    batch, tokens, heads, head_dim = _shape(qkv, num_heads)
    qkv = qkv.contiguous()
    dqkv = torch.empty_like(qkv)
    rows = batch * tokens * heads
    block_rows, warps = BACKWARD_CONFIG
    programs = triton.cdiv(rows, block_rows)
    dw_partial = torch.empty(2, programs, head_dim, device=qkv.device, dtype=torch.float32)
    _qkv_norm_rope_bwd_kernel[(programs, 3)](
        qkv, dq.contiguous(), dk.contiguous(), dv.contiguous(), dqkv, q_weight.contiguous(), k_weight.contiguous(),
        cos.float().contiguous(), sin.float().contiguous(), dw_partial, rows, eps, HEADS=heads, TOKENS=tokens,
        D=head_dim, BLOCK_R=block_rows, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=warps)
    dq_weight, dk_weight = (dw_partial[i].sum(0).to(w.dtype) for i, w in enumerate((q_weight, k_weight)))
    return dqkv, dq_weight, dk_weight


@qkv_norm_rope_backward.register_fake
def _(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, num_heads, eps):
    return torch.empty_like(qkv), torch.empty_like(q_weight), torch.empty_like(k_weight)


def _setup_context(ctx, inputs, output):
    qkv, q_weight, k_weight, cos, sin, num_heads, eps = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin)
    ctx.num_heads, ctx.eps = num_heads, eps


def _backward(ctx, dq, dk, dv):
    qkv, q_weight, k_weight, cos, sin = ctx.saved_tensors
    shape = _shape(qkv, ctx.num_heads)
    dq, dk, dv = (g if g is not None else qkv.new_zeros(shape) for g in (dq, dk, dv))
    dqkv, dq_weight, dk_weight = qkv_norm_rope_backward(dq, dk, dv, qkv, q_weight, k_weight, cos, sin,
                                                        ctx.num_heads, ctx.eps)
    return dqkv, dq_weight, dk_weight, None, None, None, None


qkv_norm_rope.register_autograd(_backward, setup_context=_setup_context)
