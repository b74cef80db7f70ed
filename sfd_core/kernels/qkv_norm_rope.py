"""``sfd::qkv_norm_rope``: fused qkv split + QK RMSNorm + 2-D RoPE (and its backward) for LightningDiT attention.

Forward, per (token, head) row of the qkv projection [B, N, 3, H, D]: q and k get RMSNorm over D (fp32 statistics,
rounded to the activation dtype, scaled by the fp32 weight, rounded again: the module's order) and then the
interleaved-pair rotation ``y cos + rot(y) sin`` (``sfd_core.models.rope``); v is copied. All three come out as
[B, N, H, D] (SDPA reads them as [B, H, N, D] through a transpose view).

Backward, per row: RoPE's transpose, then RMSNorm's ``dx = r (dn - n mean(dn n))`` with ``n = x r`` recomputed
from qkv (cheaper than storing it), written straight into the [B, N, 3HD] qkv gradient with dv beside it; the
norm weights' gradients are per-program partial sums, reduced by the autograd formula (traced by Inductor).

With ``bias`` the projection comes without its bias (``F.linear(x, qkv.weight)``): the kernels add it (rounded to
the activation dtype, as the linear layer's output is), and the backward returns its gradient from per-program,
per-head column sums of the qkv gradient it writes anyway, instead of a separate reduction over all its rows.
Each backward program walks several token tiles so that these partials stay a small fraction of the gradient.

Without the kernel, Inductor lowers this to separate statistics, rotation, stacking and permute-copy kernels
(about 30 ms of a 246 ms XL/1 step at batch 128 on an H200); the fused pair takes 12 ms (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch

from sfd_core.kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # A program's tile is [tokens x heads, D] rows of one plane (q, k or v), heads padded to a power of two so
    # that the bias gradient is a reshape to [tokens, heads, D] and a sum over tokens. Rows are loaded whole
    # (coalesced, D padded to a power of two); RoPE's pair rotation is a register reshape [R, D/2, 2] -> split ->
    # join. (Loading even and odd halves with stride 2 instead measured 10x slower; a 3-D [tokens, heads, D] tile
    # compiled to more layout conversions and spilled in Triton 3.6: benchmarks/kernel_sass.py.)

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
    def _row_block(block, plane, tokens, HEADS: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """Token block ``block`` as BLOCK_T * BLOCK_H rows (token, padded head): the rows' offsets in qkv (src)
        and in [B, N, H, D] (dst), the token's position in its image (pos), the column index and the mask."""
        r = tl.arange(0, BLOCK_T * BLOCK_H)
        token = block.to(tl.int64) * BLOCK_T + r // BLOCK_H
        head = r % BLOCK_H
        d = tl.arange(0, BLOCK_D)
        mask = ((token < tokens) & (head < HEADS))[:, None] & (d < D)[None, :]
        src = token * (3 * HEADS * D) + plane * (HEADS * D) + head * D
        return src, (token * HEADS + head) * D, token % TOKENS, d, mask

    @triton.jit
    def _load_rows(qkv_ptr, bias_ptr, src, d, mask, HEADS: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The rows of qkv in fp32, with the projection's bias added and rounded like a linear layer's output."""
        x = tl.load(qkv_ptr + src[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dtype = qkv_ptr.dtype.element_ty
            # src modulo one token's 3HD values is the row's offset in the bias
            bias = tl.load(bias_ptr + (src % (3 * HEADS * D))[:, None] + d[None, :], mask=mask, other=0.0)
            x = (x + bias.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        return x

    @triton.jit
    def _norm_rope_rows(qkv_ptr, bias_ptr, out_ptr, w_ptr, cos_ptr, sin_ptr, src, dst, pos, d, mask, eps,
                        HEADS: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        dtype = qkv_ptr.dtype.element_ty
        x = _load_rows(qkv_ptr, bias_ptr, src, d, mask, HEADS, D, HAS_BIAS)
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
    def _qkv_norm_rope_fwd_kernel(qkv_ptr, bias_ptr, q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, tokens,
                                  eps, HEADS: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr,
                                  HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
        plane = tl.program_id(1)   # 0 q, 1 k, 2 v
        src, dst, pos, d, mask = _row_block(tl.program_id(0), plane, tokens, HEADS, TOKENS, D, BLOCK_T, BLOCK_H,
                                            BLOCK_D)
        if plane == 0:
            _norm_rope_rows(qkv_ptr, bias_ptr, q_ptr, qw_ptr, cos_ptr, sin_ptr, src, dst, pos, d, mask, eps,
                            HEADS, D, HAS_BIAS, BLOCK_T * BLOCK_H, BLOCK_D)
        elif plane == 1:
            _norm_rope_rows(qkv_ptr, bias_ptr, k_ptr, kw_ptr, cos_ptr, sin_ptr, src, dst, pos, d, mask, eps,
                            HEADS, D, HAS_BIAS, BLOCK_T * BLOCK_H, BLOCK_D)
        else:
            v = _load_rows(qkv_ptr, bias_ptr, src, d, mask, HEADS, D, HAS_BIAS)
            tl.store(v_ptr + dst[:, None] + d[None, :], v.to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_rows_backward(qkv_ptr, bias_ptr, grad_ptr, w_ptr, cos_ptr, sin_ptr, src, dst, pos, d, mask, eps,
                                 HEADS: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """(d qkv rows in fp32, this block's share of d weight)."""
        x = _load_rows(qkv_ptr, bias_ptr, src, d, mask, HEADS, D, HAS_BIAS)
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
        return dx, tl.sum(dy * normed, axis=0)

    @triton.jit
    def _qkv_norm_rope_bwd_kernel(qkv_ptr, bias_ptr, dq_ptr, dk_ptr, dv_ptr, dqkv_ptr, qw_ptr, kw_ptr, cos_ptr,
                                  sin_ptr, partial_ptr, partial_width, tokens, eps, HEADS: tl.constexpr,
                                  TOKENS: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                                  TILES: tl.constexpr):
        plane = tl.program_id(1)   # 0 q, 1 k, 2 v
        dtype = dqkv_ptr.dtype.element_ty
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for i in range(TILES):
            src, dst, pos, d, mask = _row_block(tl.program_id(0) * TILES + i, plane, tokens, HEADS, TOKENS, D,
                                                BLOCK_T, BLOCK_H, BLOCK_D)
            if plane == 0:
                dx, dw_tile = _norm_rope_rows_backward(qkv_ptr, bias_ptr, dq_ptr, qw_ptr, cos_ptr, sin_ptr, src, dst,
                                                       pos, d, mask, eps, HEADS, D, HAS_BIAS, BLOCK_T * BLOCK_H,
                                                       BLOCK_D)
                dw += dw_tile
            elif plane == 1:
                dx, dw_tile = _norm_rope_rows_backward(qkv_ptr, bias_ptr, dk_ptr, kw_ptr, cos_ptr, sin_ptr, src, dst,
                                                       pos, d, mask, eps, HEADS, D, HAS_BIAS, BLOCK_T * BLOCK_H,
                                                       BLOCK_D)
                dw += dw_tile
            else:
                dx = tl.load(dv_ptr + dst[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            dx = dx.to(dtype)
            tl.store(dqkv_ptr + src[:, None] + d[None, :], dx, mask=mask)
            if HAS_BIAS:   # sums over the tile's tokens of the gradient as written (masked rows are zeros)
                dbias += tl.sum(tl.reshape(dx.to(tl.float32), [BLOCK_T, BLOCK_H, BLOCK_D]), axis=0)
        # this program's row of partials: [q weight (D) | k weight (D) | bias (3HD, with the bias)]
        d = tl.arange(0, BLOCK_D)
        partial_ptr += tl.program_id(0).to(tl.int64) * partial_width
        if plane < 2:
            tl.store(partial_ptr + plane * D + d, dw, mask=d < D)
        if HAS_BIAS:
            h = tl.arange(0, BLOCK_H)[:, None]
            tl.store(partial_ptr + 2 * D + plane * (HEADS * D) + h * D + d[None, :], dbias,
                     mask=(h < HEADS) & (d < D)[None, :])

# Forward (tokens per program, warps); backward (tokens per tile, warps, tiles per program). At XL/1 (16 heads) the
# defaults are the row counts measured best on an H200 before the bias moved into the kernels (16 and 32 rows, 2
# warps; benchmarks/kernels.py --sweep); 8 tiles per program keep the bias partials at 1/16 of the gradient's bytes
# (2 / (tokens x tiles): fp32 partials of bf16 values). The tiles per program are not measured yet.
FORWARD_CONFIG = (1, 2)
BACKWARD_CONFIG = (2, 2, 8)


def _shape(qkv: torch.Tensor, num_heads: int) -> tuple[int, int, int, int]:
    batch, tokens, width = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not 3 x {num_heads} heads x head_dim")
    return batch, tokens, num_heads, width // (3 * num_heads)


def _check_bias(qkv: torch.Tensor, bias: torch.Tensor | None) -> None:
    if bias is not None and bias.shape != (qkv.shape[-1],):
        raise ValueError(f"bias must be [{qkv.shape[-1]}] like qkv's last dim; got {tuple(bias.shape)}")


def _block_dims(head_dim: int, num_heads: int) -> dict:
    return {"BLOCK_D": triton.next_power_of_2(head_dim), "BLOCK_H": triton.next_power_of_2(num_heads)}


def _backward_programs(batch: int, tokens: int) -> int:
    block_tokens, _, tiles = BACKWARD_CONFIG
    return triton.cdiv(batch * tokens, block_tokens * tiles)


def _partials_width(heads: int, head_dim: int, with_bias: bool) -> int:
    return 2 * head_dim + (3 * heads * head_dim if with_bias else 0)


@torch.library.custom_op("sfd::qkv_norm_rope", mutates_args=())
def qkv_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, num_heads: int, eps: float,
                  bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, N, 3*H*D] (rows ordered (3, H, D); plus ``bias`` [3HD], if given) -> RoPE(RMSNorm(q)),
    RoPE(RMSNorm(k)), v, each [B, N, H, D]."""
    batch, tokens, heads, head_dim = _shape(qkv, num_heads)
    _check_bias(qkv, bias)
    qkv = qkv.contiguous()
    q, k, v = (qkv.new_empty(batch, tokens, heads, head_dim) for _ in range(3))
    block_tokens, warps = FORWARD_CONFIG
    _qkv_norm_rope_fwd_kernel[(triton.cdiv(batch * tokens, block_tokens), 3)](
        qkv, qkv if bias is None else bias.contiguous(), q, k, v, q_weight.contiguous(), k_weight.contiguous(),
        cos.float().contiguous(), sin.float().contiguous(), batch * tokens, eps, HEADS=heads, TOKENS=tokens,
        D=head_dim, HAS_BIAS=bias is not None, BLOCK_T=block_tokens, num_warps=warps,
        **_block_dims(head_dim, heads))
    return q, k, v


@qkv_norm_rope.register_fake
def _(qkv, q_weight, k_weight, cos, sin, num_heads, eps, bias=None):
    batch, tokens, heads, head_dim = _shape(qkv, num_heads)
    return tuple(qkv.new_empty(batch, tokens, heads, head_dim) for _ in range(3))


@torch.library.custom_op("sfd::qkv_norm_rope_backward", mutates_args=())
def qkv_norm_rope_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor,
                           q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           num_heads: int, eps: float,
                           bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (d qkv [B, N, 3HD], per-program partial sums [programs, 2D (+ 3HD)]: each row holds d q_weight,
    d k_weight and, with ``bias``, d bias). The caller sums the partials over programs, where Inductor can
    fuse that sum with the casts to the parameters' dtypes."""
    batch, tokens, heads, head_dim = _shape(qkv, num_heads)
    _check_bias(qkv, bias)
    qkv = qkv.contiguous()
    dqkv = torch.empty_like(qkv)
    block_tokens, warps, tiles = BACKWARD_CONFIG
    programs = _backward_programs(batch, tokens)
    width = _partials_width(heads, head_dim, bias is not None)
    partials = torch.empty(programs, width, device=qkv.device, dtype=torch.float32)
    _qkv_norm_rope_bwd_kernel[(programs, 3)](
        qkv, qkv if bias is None else bias.contiguous(), dq.contiguous(), dk.contiguous(), dv.contiguous(), dqkv,
        q_weight.contiguous(), k_weight.contiguous(), cos.float().contiguous(), sin.float().contiguous(),
        partials, width, batch * tokens, eps, HEADS=heads, TOKENS=tokens, D=head_dim, HAS_BIAS=bias is not None,
        BLOCK_T=block_tokens, TILES=tiles, num_warps=warps, **_block_dims(head_dim, heads))
    return dqkv, partials


@qkv_norm_rope_backward.register_fake
def _(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, num_heads, eps, bias=None):
    batch, tokens, heads, head_dim = _shape(qkv, num_heads)
    return torch.empty_like(qkv), qkv.new_empty(_backward_programs(batch, tokens),
                                                _partials_width(heads, head_dim, bias is not None),
                                                dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    qkv, q_weight, k_weight, cos, sin, num_heads, eps, bias = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin, bias)
    ctx.num_heads, ctx.eps = num_heads, eps


def _backward(ctx, dq, dk, dv):
    qkv, q_weight, k_weight, cos, sin, bias = ctx.saved_tensors
    shape = _shape(qkv, ctx.num_heads)
    dq, dk, dv = (g if g is not None else qkv.new_zeros(shape) for g in (dq, dk, dv))
    dqkv, partials = qkv_norm_rope_backward(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, ctx.num_heads, ctx.eps,
                                            bias)
    sums = partials.sum(0)
    dq_weight, dk_weight, dbias = sums.split([shape[3], shape[3], sums.numel() - 2 * shape[3]])
    return (dqkv, dq_weight.to(q_weight.dtype), dk_weight.to(k_weight.dtype), None, None, None, None,
            dbias.to(bias.dtype) if bias is not None else None)


qkv_norm_rope.register_autograd(_backward, setup_context=_setup_context)
