"""AdamW + EMA over a list of fp32 weights in one Triton launch: each value is read and written once.

torch's fused AdamW and a separate multi-tensor EMA move 40 B per weight value (the EMA reads the weight again)
and reach ~0.72 of the copy bandwidth on an H200 at XL/1 size (9.1 ms per update, benchmarks/optimizer.py);
this kernel moves 36 B. Compiling the same update with Inductor takes minutes for the 414 weights of XL/1.

The weights are addressed through a pointer table built per call (the gradients are new tensors every step):
row r of ``table`` [7, T] holds tensor t's weight, gradient, first and second moment, EMA and step-count
addresses and its size. Each program updates one piece of ``BLOCKS`` blocks of one tensor; ``block_tensor`` /
``block_start`` map programs to (tensor, offset). Step counts are read here and incremented afterwards by the
caller (every program of a tensor must see the same count).
"""
from __future__ import annotations

import math

import torch

from sfd_core.kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _update(param_ptr, grad_ptr, m_ptr, v_ptr, ema_ptr, offs, mask, lr, beta1, beta2, eps, decay_factor,
                ema_weight, correction1, correction2_sqrt):
        grad = tl.load(grad_ptr + offs, mask=mask)
        m = beta1 * tl.load(m_ptr + offs, mask=mask) + (1.0 - beta1) * grad
        v = beta2 * tl.load(v_ptr + offs, mask=mask) + (1.0 - beta2) * grad * grad
        param = tl.load(param_ptr + offs, mask=mask) * decay_factor
        param = param - (lr / correction1) * m / (tl.sqrt(v) / correction2_sqrt + eps)
        ema = tl.load(ema_ptr + offs, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(param_ptr + offs, param, mask=mask)
        tl.store(ema_ptr + offs, ema + ema_weight * (param - ema), mask=mask)

    @triton.jit
    def _address(table, row, num_tensors, t):
        """Tensor t's address from row ``row`` of the table; the caller checked 16-byte alignment."""
        return tl.multiple_of(tl.load(table + row * num_tensors + t).to(tl.pointer_type(tl.float32)), 16)

    @triton.jit
    def _adamw_ema_kernel(table, block_tensor, block_start, num_tensors, lr, beta1, beta2, log_beta1, log_beta2,
                          eps, decay_factor, ema_weight, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        first = tl.multiple_of(tl.load(block_start + pid), BLOCK * BLOCKS).to(tl.int64)
        numel = tl.load(table + 6 * num_tensors + t)
        step_ptr = tl.load(table + 5 * num_tensors + t).to(tl.pointer_type(tl.float32))
        # bias corrections 1 - beta^step in float64: 1 - beta2^1 = 1e-3 would lose digits to the cancellation
        step = tl.load(step_ptr).to(tl.float64) + 1.0
        correction1 = (1.0 - tl.exp(step * log_beta1)).to(tl.float32)
        correction2_sqrt = tl.sqrt((1.0 - tl.exp(step * log_beta2)).to(tl.float32))
        ptrs = (_address(table, 0, num_tensors, t), _address(table, 1, num_tensors, t),
                _address(table, 2, num_tensors, t), _address(table, 3, num_tensors, t),
                _address(table, 4, num_tensors, t))
        # the table reads above are paid once per BLOCKS blocks of one tensor
        for i in tl.static_range(BLOCKS):
            start = first + i * BLOCK
            offs = start + tl.arange(0, BLOCK)
            # full blocks unmasked: a per-value mask (sizes of unknown divisibility) would keep the loads scalar
            if start + BLOCK <= numel:
                _update(ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], offs, None, lr, beta1, beta2, eps,
                        decay_factor, ema_weight, correction1, correction2_sqrt)
            elif start < numel:
                _update(ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], offs, offs < numel, lr, beta1, beta2, eps,
                        decay_factor, ema_weight, correction1, correction2_sqrt)

# (values per block, warps, blocks per program), measured on an H200 at XL/1 size: benchmarks/optimizer.py --configs
CONFIG = (2048, 8, 1)
TABLE_ROWS = ("param", "grad", "exp_avg", "exp_avg_sq", "ema", "step")


def program_values() -> int:
    """Values one program updates (``CONFIG``): the piece size for ``block_map``."""
    return CONFIG[0] * CONFIG[2]


def block_map(numels: list[int], block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Program -> (tensor index, first value) for tensors of these sizes cut into ``block``-sized pieces."""
    counts = torch.tensor([max(1, math.ceil(n / block)) for n in numels])
    tensor_of_block = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_block = torch.cumsum(counts, 0) - counts
    start = (torch.arange(int(counts.sum())) - first_block[tensor_of_block]) * block
    return tensor_of_block.to(torch.int32).to(device), start.to(torch.int32).to(device)


def pointer_table(tensors: dict[str, list[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """[7, T] int64 on ``device``: the addresses of each row of ``TABLE_ROWS``, then the sizes."""
    rows = [[x.data_ptr() for x in tensors[name]] for name in TABLE_ROWS]
    rows.append([x.numel() for x in tensors["param"]])
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":   # pinned: the copy runs in stream order, the host allocator keeps it until done
        return table.pin_memory().to(device, non_blocking=True)
    return table


def adamw_ema_(tensors: dict[str, list[torch.Tensor]], blocks: tuple[torch.Tensor, torch.Tensor], *, lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float, ema_decay: float) -> None:
    """One AdamW step (decoupled weight decay, bias-corrected moments) then ``ema = lerp(ema, param,
    1 - ema_decay)`` on every tensor of ``tensors`` (lists by ``TABLE_ROWS``: fp32, contiguous, one device),
    then each step count + 1. ``blocks``: ``block_map`` of their sizes with ``program_values()``."""
    device = tensors["param"][0].device
    for name in TABLE_ROWS:
        bad = [i for i, x in enumerate(tensors[name]) if x.dtype != torch.float32 or not x.is_contiguous()
               or x.device != device or x.data_ptr() % 16]
        if bad:
            raise ValueError(f"adamw_ema_ needs contiguous, 16-byte aligned fp32 {name} tensors on {device}; "
                             f"not so at {bad[:5]}")
    block, warps, blocks_per_program = CONFIG
    tensor_of_block, start = blocks
    _adamw_ema_kernel[(tensor_of_block.numel(),)](
        pointer_table(tensors, device), tensor_of_block, start, len(tensors["param"]), lr, beta1, beta2,
        math.log(beta1), math.log(beta2), eps, 1.0 - lr * weight_decay, 1.0 - ema_decay, BLOCK=block,
        BLOCKS=blocks_per_program, num_warps=warps)
    torch._foreach_add_(tensors["step"], 1.0)
