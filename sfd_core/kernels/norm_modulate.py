"""``sfd::norm_modulate`` and ``sfd::residual_norm_modulate``: the adaLN input of a LightningDiT sublayer.

Forward, per token row of [B, N, C]: optionally the gated residual update of the previous sublayer first,
``x = x + gate[b] * y`` (written out: it is the residual stream), then ``h = RMSNorm(x) * (1 + scale[b]) +
shift[b]`` with the modules' roundings (RMSNorm in fp32, rounded to the stream dtype, scaled by the fp32 weight,
rounded; ``1 + scale``, the product and the sum each rounded to their eager dtypes).

Backward: the row kernel recomputes the norm from the saved stream and writes the stream gradient
(``dx = r (dn - n mean(dn n))`` plus the gradient arriving along the residual), with the residual also
``dy = dx * gate``, and 1 / rms per row. A second kernel takes each image's sums over tokens in one coalesced
pass (``sum dh``, ``sum dh n`` with n the normalised stream, and ``sum dx y`` for the gate), from which the shift,
scale, gate and norm-weight gradients follow with [B, C] work only. (Left to Inductor as traced tensor code,
the same sums compiled to two column reductions per norm that re-read dh and the stream.)

Inductor lowers the same work to a handful of elementwise kernels and token-axis reductions that re-read the
[B, N, C] activations several times (about 33 ms of the 226 ms XL/1 step at batch 128 on an H200).
"""
from __future__ import annotations

import torch

from sfd_core.kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_y(y_ptr, y_bias_ptr, offs, c, mask, C: tl.constexpr, HAS_Y_BIAS: tl.constexpr):
        """The residual branch's output in fp32: y, or y + bias rounded to y's dtype (what the linear layer that
        made y would have written with its bias)."""
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Y_BIAS:
            dtype = y_ptr.dtype.element_ty
            bias = tl.load(y_bias_ptr + c, mask=c < C, other=0.0).to(dtype).to(tl.float32)
            y = (y + bias[None, :]).to(dtype).to(tl.float32)
        return y

    @triton.jit
    def _norm_modulate_fwd_kernel(x_ptr, y_ptr, y_bias_ptr, gate_ptr, out_ptr, h_ptr, w_ptr, shift_ptr, scale_ptr,
                                  rows, eps, TOKENS: tl.constexpr, C: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                  HAS_Y_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        stream_dtype = out_ptr.dtype.element_ty   # without the residual out_ptr is x_ptr (never written)
        cond_dtype = scale_ptr.dtype.element_ty
        h_dtype = h_ptr.dtype.element_ty
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        mask = (r < rows)[:, None] & (c < C)[None, :]
        offs = r[:, None] * C + c[None, :]
        cond = (r // TOKENS)[:, None] * C + c[None, :]   # this row's image in the [B, C] conditioning
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            y = _load_y(y_ptr, y_bias_ptr, offs, c, mask, C, HAS_Y_BIAS)
            gate = tl.load(gate_ptr + cond, mask=mask, other=0.0).to(tl.float32)
            update = (gate * y).to(gate_ptr.dtype.element_ty).to(tl.float32)
            x = (x + update).to(stream_dtype).to(tl.float32)
            tl.store(out_ptr + offs, x.to(stream_dtype), mask=mask)
        w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        normed = (x * tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)[:, None]).to(stream_dtype).to(tl.float32)
        weighted = (normed * w[None, :]).to(stream_dtype).to(tl.float32)
        one_plus_scale = (1.0 + tl.load(scale_ptr + cond, mask=mask, other=0.0).to(tl.float32)).to(cond_dtype)
        shift = tl.load(shift_ptr + cond, mask=mask, other=0.0).to(tl.float32)
        h = (weighted * one_plus_scale.to(tl.float32)).to(h_dtype).to(tl.float32) + shift
        tl.store(h_ptr + offs, h.to(h_dtype), mask=mask)

    @triton.jit
    def _norm_modulate_bwd_kernel(dh_ptr, dout_ptr, out_ptr, gate_ptr, dx_ptr, dy_ptr, rstd_ptr, w_ptr,
                                  scale_ptr, rows, eps, TOKENS: tl.constexpr, C: tl.constexpr,
                                  HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        mask = (r < rows)[:, None] & (c < C)[None, :]
        offs = r[:, None] * C + c[None, :]
        cond = (r // TOKENS)[:, None] * C + c[None, :]
        x = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)
        x_hat = x * rstd[:, None]
        one_plus_scale = (1.0 + tl.load(scale_ptr + cond, mask=mask, other=0.0).to(tl.float32))
        one_plus_scale = one_plus_scale.to(scale_ptr.dtype.element_ty).to(tl.float32)
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        dn = (dh * one_plus_scale).to(dh_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
        dx = rstd[:, None] * (dn - x_hat * (tl.sum(dn * x_hat, axis=1) / C)[:, None])
        if HAS_RESIDUAL:
            dx += tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + cond, mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + offs, (dx * gate).to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + r, rstd, mask=r < rows)

    @triton.jit
    def _token_sums_kernel(dh_ptr, out_ptr, rstd_ptr, dx_ptr, y_ptr, y_bias_ptr, sums_ptr, TOKENS: tl.constexpr,
                           C: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_Y_BIAS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """One program per (image, column block): walks the image's tokens in coalesced [BLOCK_N, BLOCK_C] tiles
        and writes the image's sums over tokens of dh, dh * normed and (residual) dx * y and dx to
        sums [B, 4, C]."""
        image = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        sum_dh = tl.zeros([BLOCK_C], dtype=tl.float32)
        sum_dh_normed = tl.zeros([BLOCK_C], dtype=tl.float32)
        sum_dx_y = tl.zeros([BLOCK_C], dtype=tl.float32)
        sum_dx = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, TOKENS, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            mask = (n < TOKENS)[:, None] & c_mask[None, :]
            offs = (image * TOKENS + n)[:, None] * C + c[None, :]
            dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + image * TOKENS + n, mask=n < TOKENS, other=0.0)
            x = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            normed = (x * rstd[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
            sum_dh += tl.sum(dh, axis=0)
            sum_dh_normed += tl.sum(dh * normed, axis=0)
            if HAS_RESIDUAL:
                dx = tl.load(dx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                y = _load_y(y_ptr, y_bias_ptr, offs, c, mask, C, HAS_Y_BIAS)
                sum_dx_y += tl.sum(dx * y, axis=0)
                sum_dx += tl.sum(dx, axis=0)
        row = sums_ptr + image * 4 * C + c
        tl.store(row, sum_dh, mask=c_mask)
        tl.store(row + C, sum_dh_normed, mask=c_mask)
        tl.store(row + 2 * C, sum_dx_y, mask=c_mask)   # zeros without the residual
        tl.store(row + 3 * C, sum_dx, mask=c_mask)

# (rows per program, warps) of each pass, measured on an H200 at XL/1 shapes with benchmarks/kernels.py
FORWARD_CONFIG = (4, 8)
BACKWARD_CONFIG = (4, 4)
# (tokens per tile, columns per program, warps) of the token sums: not measured on a GPU yet (one program per
# image and 64 columns: 576 programs at batch 32, each walking 256 tokens in 8 coalesced tiles)
TOKEN_SUMS_CONFIG = (32, 64, 4)


def _check(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 3 or shift.shape != scale.shape or shift.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"expected x [B, N, C] with shift, scale [B, C]; got {tuple(x.shape)}, "
                         f"{tuple(shift.shape)}, {tuple(scale.shape)}")
    if shift.dtype != scale.dtype:
        raise ValueError(f"shift and scale differ in dtype ({shift.dtype}, {scale.dtype})")
    return x.shape


def _update_dtype(y: torch.Tensor, gate: torch.Tensor) -> torch.dtype:
    return torch.promote_types(gate.dtype, y.dtype)


def _forward(x, y, gate, weight, shift, scale, eps, y_bias=None):
    batch, tokens, width = _check(x, shift, scale)
    x = x.contiguous()
    if y is None:
        out, stream_dtype = x, x.dtype
    else:
        gate = gate.to(_update_dtype(y, gate)).contiguous()   # gate * y is rounded to this dtype
        stream_dtype = torch.promote_types(x.dtype, gate.dtype)
        out = torch.empty(x.shape, device=x.device, dtype=stream_dtype)
    h = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(stream_dtype, scale.dtype))
    rows = batch * tokens
    block_rows, warps = FORWARD_CONFIG
    _norm_modulate_fwd_kernel[(triton.cdiv(rows, block_rows),)](
        x, x if y is None else y.contiguous(), x if y_bias is None else y_bias.contiguous(),
        x if gate is None else gate, out, h, weight.contiguous(), shift.contiguous(), scale.contiguous(), rows, eps,
        TOKENS=tokens, C=width, HAS_RESIDUAL=y is not None, HAS_Y_BIAS=y_bias is not None, BLOCK_R=block_rows,
        BLOCK_C=triton.next_power_of_2(width), num_warps=warps)
    return out, h


@torch.library.custom_op("sfd::norm_modulate", mutates_args=())
def norm_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """``modulate(RMSNorm(x), shift, scale)`` for x [B, N, C], shift and scale [B, C]."""
    return _forward(x, None, None, weight, shift, scale, eps)[1]


@norm_modulate.register_fake
def _(x, weight, shift, scale, eps):
    return torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, scale.dtype))


@torch.library.custom_op("sfd::residual_norm_modulate", mutates_args=())
def residual_norm_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                           shift: torch.Tensor, scale: torch.Tensor, eps: float,
                           y_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + gate * y`` (the updated stream) and ``modulate(RMSNorm(x + gate * y), shift, scale)``; gate [B, C].
    With ``y_bias`` [C], y is a linear layer's output without its bias, and ``y + y_bias`` is used instead (the
    bias gradient then comes from the token sums, not from a separate sum over the rows of y's gradient)."""
    if y_bias is not None and y_bias.shape != (x.shape[-1],):
        raise ValueError(f"y_bias must be [{x.shape[-1]}]; got {tuple(y_bias.shape)}")
    return _forward(x, y, gate, weight, shift, scale, eps, y_bias)


@residual_norm_modulate.register_fake
def _(x, y, gate, weight, shift, scale, eps, y_bias=None):
    stream_dtype = torch.promote_types(x.dtype, _update_dtype(y, gate))
    return (torch.empty(x.shape, device=x.device, dtype=stream_dtype),
            torch.empty(x.shape, device=x.device, dtype=torch.promote_types(stream_dtype, scale.dtype)))


@torch.library.custom_op("sfd::norm_modulate_backward", mutates_args=())
def norm_modulate_backward(dh: torch.Tensor, dout: torch.Tensor | None, out: torch.Tensor, y: torch.Tensor | None,
                           gate: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor, x_dtype: torch.dtype,
                           eps: float) -> list[torch.Tensor]:
    """The row-wise part of both ops' backward, from the saved stream ``out`` (x itself without the residual):
    [d x, 1 / rms per row] and, with the residual (y given: d y has its dtype), [d y] after them. The token-axis
    sums are in ``norm_modulate_token_sums``."""
    batch, tokens, width = _check(out, scale, scale)
    residual = y is not None
    dx = torch.empty(out.shape, device=out.device, dtype=x_dtype)
    dy = torch.empty_like(y) if residual else dx
    rstd = torch.empty(batch, tokens, device=out.device, dtype=torch.float32)
    rows = batch * tokens
    block_rows, warps = BACKWARD_CONFIG
    _norm_modulate_bwd_kernel[(triton.cdiv(rows, block_rows),)](
        dh.contiguous(), dout.contiguous() if residual else dh, out.contiguous(),
        gate.to(_update_dtype(y, gate)).contiguous() if residual else scale, dx, dy, rstd, weight.contiguous(),
        scale.contiguous(), rows, eps, TOKENS=tokens, C=width, HAS_RESIDUAL=residual, BLOCK_R=block_rows,
        BLOCK_C=triton.next_power_of_2(width), num_warps=warps)
    return [dx, rstd, dy] if residual else [dx, rstd]


@norm_modulate_backward.register_fake
def _(dh, dout, out, y, gate, weight, scale, x_dtype, eps):
    grads = [torch.empty(out.shape, device=out.device, dtype=x_dtype),
             out.new_empty(out.shape[:2], dtype=torch.float32)]
    return (grads + [torch.empty_like(y)]) if y is not None else grads


@torch.library.custom_op("sfd::norm_modulate_token_sums", mutates_args=())
def norm_modulate_token_sums(dh: torch.Tensor, out: torch.Tensor, rstd: torch.Tensor, dx: torch.Tensor | None,
                             y: torch.Tensor | None, y_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per image, sums over tokens in fp32 -> [B, 4, C]: of dh, of dh * RMSNorm(out) (normalised, rounded to the
    stream dtype, before the weight) and, with the residual (dx, y given), of dx * y (the gate's gradient; y plus
    ``y_bias`` where given) and of dx (zeros without the residual)."""
    batch, tokens, width = out.shape
    residual = y is not None
    sums = torch.empty(batch, 4, width, device=out.device, dtype=torch.float32)
    block_n, block_c, warps = TOKEN_SUMS_CONFIG
    _token_sums_kernel[(batch, triton.cdiv(width, block_c))](
        dh.contiguous(), out.contiguous(), rstd.contiguous(), dx.contiguous() if residual else dh,
        y.contiguous() if residual else dh, dh if y_bias is None else y_bias.contiguous(), sums, TOKENS=tokens,
        C=width, HAS_RESIDUAL=residual, HAS_Y_BIAS=y_bias is not None, BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=warps)
    return sums


@norm_modulate_token_sums.register_fake
def _(dh, out, rstd, dx, y, y_bias=None):
    return out.new_empty(out.shape[0], 4, out.shape[2], dtype=torch.float32)


def _conditioning_grads(sums, weight, scale):
    """Norm weight, shift and scale gradients from the per-image token sums: with n = RMSNorm(x) before the
    weight, d shift = sum dh, d scale = w sum dh n and d w = sum over images of (1 + scale) sum dh n. Only [B, C]
    work is left after the one pass over the tokens (the scale and weight gradients are exact sums taken in fp32,
    without the bf16 roundings of the forward's intermediate products)."""
    sum_dh_normed = sums[:, 1]
    one_plus_scale = (1 + scale).float()   # rounded like the forward's (1 + scale)
    d_weight = (sum_dh_normed * one_plus_scale).sum(0).to(weight.dtype)
    return d_weight, sums[:, 0].to(scale.dtype), (sum_dh_normed * weight.float()).to(scale.dtype)


def _setup_plain(ctx, inputs, output):
    x, weight, shift, scale, eps = inputs
    ctx.save_for_backward(x, weight, scale)
    ctx.eps = eps


def _backward_plain(ctx, dh):
    x, weight, scale = ctx.saved_tensors
    dx, rstd = norm_modulate_backward(dh, None, x, None, None, weight, scale, x.dtype, ctx.eps)
    sums = norm_modulate_token_sums(dh, x, rstd, None, None)
    return dx, *_conditioning_grads(sums, weight, scale), None


def _setup_residual(ctx, inputs, output):
    x, y, gate, weight, shift, scale, eps, y_bias = inputs
    ctx.save_for_backward(output[0], y, gate, weight, scale, y_bias)
    ctx.eps, ctx.x_dtype = eps, x.dtype


def _backward_residual(ctx, dout, dh):
    out, y, gate, weight, scale, y_bias = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dh = torch.zeros(out.shape, device=out.device, dtype=torch.promote_types(out.dtype, scale.dtype)) \
        if dh is None else dh
    dx, rstd, dy = norm_modulate_backward(dh, dout, out, y, gate, weight, scale, ctx.x_dtype, ctx.eps)
    sums = norm_modulate_token_sums(dh, out, rstd, dx, y, y_bias)
    # d y_bias = sum over images and tokens of dy = dx gate: the per-image sums of dx, weighted by the gate
    d_bias = None if y_bias is None else (sums[:, 3] * gate.float()).sum(0).to(y_bias.dtype)
    return dx, dy, sums[:, 2].to(gate.dtype), *_conditioning_grads(sums, weight, scale), None, d_bias


norm_modulate.register_autograd(_backward_plain, setup_context=_setup_plain)
residual_norm_modulate.register_autograd(_backward_residual, setup_context=_setup_residual)
