"""AdamW + EMA over a list of fp32 weights in one Triton launch: each value is read and written once.

torch's fused AdamW and a separate multi-tensor EMA move 40 B per weight value (the EMA reads the weight again)
and reach ~0.72 of the copy bandwidth on an H200 at XL/1 size (9.1 ms per update, benchmarks/optimizer.py);
this kernel moves 36 B. Compiling the same update with Inductor takes minutes for the 414 weights of XL/1.
With ``WORKING_BF16`` the weights are fp32 masters of a model that computes with bf16 copies: the gradients are
read as bf16 and the updated master is also stored, rounded, into the bf16 copy (36 B per weight again: 2 less
for the gradient, 2 more for the copy).

The weights are addressed through a pointer table (``pointer_table``): row r of the [8, T] table holds tensor
t's address in ``TABLE_ROWS[r]`` (weight, gradient, first and second moment, EMA, step count, bf16 copy) and
row 7 its size. Each program updates one piece of ``BLOCKS`` blocks of one tensor; ``block_tensor`` /
``block_start`` map programs to (tensor, offset). Step counts are read here and incremented afterwards by the
caller (every program of a tensor must see the same count). Nothing is read from the host per step beyond the
scalars, so a launch with a cached table can be captured in a CUDA graph.
"""
from __future__ import annotations

import math

import torch

from sfd_core.kernels import INTERPRET, TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _round_to_bf16(x, ON_THE_BITS: tl.constexpr):
        """fp32 -> bf16 rounded to nearest even, as torch rounds: the GPU's conversion does so; Triton's
        interpreter truncates in a cast, so there it is done on the bits (NaN stays NaN)."""
        if ON_THE_BITS:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(x == x, rounded, x.to(tl.bfloat16))
        return x.to(tl.bfloat16)

    @triton.jit
    def _update(param_ptr, grad_ptr, m_ptr, v_ptr, ema_ptr, working_ptr, offs, mask, lr, beta1, beta2, eps,
                decay_factor, ema_weight, correction1, correction2_sqrt, WORKING_BF16: tl.constexpr,
                ROUND_ON_THE_BITS: tl.constexpr):
        grad = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        m = beta1 * tl.load(m_ptr + offs, mask=mask) + (1.0 - beta1) * grad
        v = beta2 * tl.load(v_ptr + offs, mask=mask) + (1.0 - beta2) * grad * grad
        param = tl.load(param_ptr + offs, mask=mask) * decay_factor
        param = param - (lr / correction1) * m / (tl.sqrt(v) / correction2_sqrt + eps)
        ema = tl.load(ema_ptr + offs, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(param_ptr + offs, param, mask=mask)
        tl.store(ema_ptr + offs, ema + ema_weight * (param - ema), mask=mask)
        if WORKING_BF16:
            tl.store(working_ptr + offs, _round_to_bf16(param, ROUND_ON_THE_BITS), mask=mask)

    @triton.jit
    def _address(table, row, num_tensors, t, dtype: tl.constexpr):
        """Tensor t's address from row ``row`` of the table; ``pointer_table`` checked 16-byte alignment."""
        return tl.multiple_of(tl.load(table + row * num_tensors + t).to(tl.pointer_type(dtype)), 16)

    @triton.jit
    def _adamw_ema_kernel(table, block_tensor, block_start, num_tensors, lr, beta1, beta2, log_beta1, log_beta2,
                          eps, decay_factor, ema_weight, BLOCK: tl.constexpr, BLOCKS: tl.constexpr,
                          WORKING_BF16: tl.constexpr, ROUND_ON_THE_BITS: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        first = tl.multiple_of(tl.load(block_start + pid), BLOCK * BLOCKS).to(tl.int64)
        numel = tl.load(table + 7 * num_tensors + t)
        step_ptr = tl.load(table + 5 * num_tensors + t).to(tl.pointer_type(tl.float32))
        # bias corrections 1 - beta^step in float64: 1 - beta2^1 = 1e-3 would lose digits to the cancellation
        step = tl.load(step_ptr).to(tl.float64) + 1.0
        correction1 = (1.0 - tl.exp(step * log_beta1)).to(tl.float32)
        correction2_sqrt = tl.sqrt((1.0 - tl.exp(step * log_beta2)).to(tl.float32))
        low: tl.constexpr = tl.bfloat16 if WORKING_BF16 else tl.float32
        ptrs = (_address(table, 0, num_tensors, t, tl.float32), _address(table, 1, num_tensors, t, low),
                _address(table, 2, num_tensors, t, tl.float32), _address(table, 3, num_tensors, t, tl.float32),
                _address(table, 4, num_tensors, t, tl.float32), _address(table, 6, num_tensors, t, low))
        # the table reads above are paid once per BLOCKS blocks of one tensor
        for i in tl.static_range(BLOCKS):
            start = first + i * BLOCK
            offs = start + tl.arange(0, BLOCK)
            # full blocks unmasked: a per-value mask (sizes of unknown divisibility) would keep the loads scalar
            if start + BLOCK <= numel:
                _update(ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5], offs, None, lr, beta1, beta2, eps,
                        decay_factor, ema_weight, correction1, correction2_sqrt, WORKING_BF16, ROUND_ON_THE_BITS)
            elif start < numel:
                _update(ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5], offs, offs < numel, lr, beta1,
                        beta2, eps, decay_factor, ema_weight, correction1, correction2_sqrt, WORKING_BF16,
                        ROUND_ON_THE_BITS)

# (values per block, warps, blocks per program) for fp32 / bf16 working weights, measured on an H200 at XL/1 size
# (benchmarks/optimizer.py --configs). With bf16 ones, blocks of 4 values per thread: at 8 per thread (where the
# bf16 accesses would vectorise wider than the fp32 ones, most likely forcing layout conversions) it ran 40% slower
# (9.45 ms at 2048:8:1 against 6.77 at 1024:8:2, the fp32 weights' 6.76).
CONFIGS = {False: (2048, 8, 1), True: (1024, 8, 2)}
# bf16 rounding of the working copies done on the bits only where the cast would truncate (the interpreter): on an
# H200 it cost 0.8 ms per XL/1 update over the GPU's own rounding conversion
ROUND_ON_THE_BITS = INTERPRET
TABLE_ROWS = ("param", "grad", "exp_avg", "exp_avg_sq", "ema", "step", "working")


def program_values(working_bf16: bool) -> int:
    """Values one program updates (``CONFIGS``): the piece size for ``block_map``."""
    block, _, blocks_per_program = CONFIGS[working_bf16]
    return block * blocks_per_program


def block_map(numels: list[int], block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Program -> (tensor index, first value) for tensors of these sizes cut into ``block``-sized pieces."""
    counts = torch.tensor([max(1, math.ceil(n / block)) for n in numels])
    tensor_of_block = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_block = torch.cumsum(counts, 0) - counts
    start = (torch.arange(int(counts.sum())) - first_block[tensor_of_block]) * block
    return tensor_of_block.to(torch.int32).to(device), start.to(torch.int32).to(device)


def pointer_table(tensors: dict[str, list[torch.Tensor]], working_bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(host table, device table) [8, T] int64: the addresses of ``tensors`` (lists by ``TABLE_ROWS``; without
    ``working_bf16`` the "working" row may be left out), then the sizes, after checking what the kernel assumes:
    contiguous, 16-byte aligned, one device, fp32 (gradient and working copy bf16 with ``working_bf16``).
    The host table is pinned on CUDA: keep it alive as long as a captured copy from it may replay."""
    tensors = {"working": tensors["param"], **tensors}
    device = tensors["param"][0].device
    for name in TABLE_ROWS:
        dtype = torch.bfloat16 if working_bf16 and name in ("grad", "working") else torch.float32
        bad = [i for i, x in enumerate(tensors[name]) if x.dtype != dtype or not x.is_contiguous()
               or x.device != device or x.data_ptr() % 16
               or (name != "step" and x.numel() != tensors["param"][i].numel())]
        if bad:
            raise ValueError(f"adamw_ema_ needs contiguous, 16-byte aligned {str(dtype)[6:]} {name} tensors of "
                             f"the weights' sizes on {device}; not so at {bad[:5]}")
    rows = [[x.data_ptr() for x in tensors[name]] for name in TABLE_ROWS]
    rows.append([x.numel() for x in tensors["param"]])
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return host, host
    host = host.pin_memory()   # the copy runs in stream order
    return host, host.to(device, non_blocking=True)


def adamw_ema_(table: torch.Tensor, blocks: tuple[torch.Tensor, torch.Tensor], steps: list[torch.Tensor], *,
               working_bf16: bool, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               ema_decay: float) -> None:
    """One AdamW step (decoupled weight decay, bias-corrected moments) then ``ema = lerp(ema, param,
    1 - ema_decay)`` on every tensor of ``table`` (``pointer_table``'s device table), the bf16 working copies
    written too with ``working_bf16``, then each step count + 1. ``blocks``: ``block_map`` of their sizes with
    ``program_values(working_bf16)``; ``steps``: the step-count tensors of the table's "step" row."""
    block, warps, blocks_per_program = CONFIGS[working_bf16]
    tensor_of_block, start = blocks
    _adamw_ema_kernel[(tensor_of_block.numel(),)](
        table, tensor_of_block, start, table.shape[1], lr, beta1, beta2, math.log(beta1), math.log(beta2), eps,
        1.0 - lr * weight_decay, 1.0 - ema_decay, BLOCK=block, BLOCKS=blocks_per_program,
        WORKING_BF16=working_bf16, ROUND_ON_THE_BITS=ROUND_ON_THE_BITS, num_warps=warps)
    torch._foreach_add_(steps, 1.0)
