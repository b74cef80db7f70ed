"""The update after each backward: AdamW on the weights, then the EMA of the updated weights (official order).

The trainer (``sfd_core.train_sfd``), the demo and the benchmarks step through :class:`AdamWWithEMA`. With
``fused=True`` (the default) and the weights on a device the Triton kernels run on, both updates are one launch
of ``sfd_core.kernels.adamw_ema`` (each value read and written once, 36 B per weight instead of 40: 6.76 against
8.59 ms at XL/1 on an H200, benchmarks/optimizer.py); otherwise torch's fused AdamW (CUDA) or foreach AdamW
(CPU) runs, then one multi-tensor EMA pass.

``bf16_weights`` (e.g. :func:`autocast_weights`) keeps those weights in the model as bf16 compute copies and
their fp32 masters here (``master_weights``): under bf16 autocast the forward and the gradients are the same
as with fp32 weights (autocast would round the weights to bf16 before each matmul, and the matmul gradients are
bf16 either way), minus the cast kernels of every step (fp32 -> bf16 weights, bf16 -> fp32 gradients).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from sfd_core.kernels import kernels_run_on


def autocast_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable weights and biases of ``model``'s linear and convolution layers: what bf16 autocast casts to
    bf16 before every use (norm weights, embeddings and the like it does not)."""
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return [p for m in model.modules() if isinstance(m, layers) for p in m.parameters(recurse=False)
            if p.requires_grad]


class AdamWWithEMA:
    """``step()``: AdamW on ``params`` from their ``.grad`` (weights without a gradient are left alone, as
    torch's AdamW does), then the EMA of every weight it updated.

    ``optimizer`` is a ``torch.optim.AdamW`` over ``master_weights`` (the params themselves, or the fp32 masters
    of ``bf16_weights``) that holds the state in its own format whichever path steps it: its ``state_dict`` and
    ``master_weights`` are what a checkpoint keeps, and a state saved by one path resumes in the other.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], ema_params: Iterable[torch.Tensor], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 ema_decay: float = 0.9999, fused: bool = True, bf16_weights: Iterable[torch.nn.Parameter] = ()):
        self.params, self.ema_params = list(params), list(ema_params)
        if len(self.params) != len(self.ema_params) or any(
                p.shape != e.shape for p, e in zip(self.params, self.ema_params)):
            raise ValueError("params and ema_params must pair up one to one with equal shapes")
        low = {id(p) for p in bf16_weights}
        if low - {id(p) for p in self.params}:
            raise ValueError("bf16_weights must be among params")
        self.bf16 = [id(p) in low for p in self.params]
        if any(p.dtype != torch.float32 for p, b in zip(self.params, self.bf16) if b):
            raise ValueError("bf16_weights must start as fp32 weights: their values become the masters")
        self.master_weights = [p.detach().clone() if b else p for p, b in zip(self.params, self.bf16)]
        for p, b in zip(self.params, self.bf16):
            if b:
                p.data = p.data.to(torch.bfloat16)
        self.ema_decay = float(ema_decay)
        self.fused = fused and kernels_run_on(self.params[0])
        cuda = self.params[0].is_cuda
        # torch's fused AdamW keeps its step counts on the device, where the kernel reads them too
        self.optimizer = torch.optim.AdamW(self.master_weights, lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay,
                                           **(dict(fused=True) if cuda else dict(foreach=True)))
        self._block_maps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tables: dict[bool, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        stepped = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not self.fused:
            self._step_eager(stepped)
            return
        for bf16 in (False, True):
            group = [i for i in stepped if self.bf16[i] == bf16]
            if group:
                self._step_fused(group, bf16)

    def _step_eager(self, stepped: list[int]) -> None:
        for i in stepped:
            if self.bf16[i]:
                self.master_weights[i].grad = self.params[i].grad.float()
        self.optimizer.step()
        low = [i for i in stepped if self.bf16[i]]
        if low:
            torch._foreach_copy_([self.params[i] for i in low], [self.master_weights[i] for i in low])
            for i in low:
                self.master_weights[i].grad = None
        torch._foreach_lerp_([self.ema_params[i] for i in stepped], [self.master_weights[i] for i in stepped],
                             1.0 - self.ema_decay)

    def _step_fused(self, group: list[int], bf16: bool) -> None:
        from sfd_core.kernels.adamw_ema import adamw_ema_, block_map, pointer_table, program_values

        key = (bf16, program_values(bf16), *group)
        if key not in self._block_maps:
            self._block_maps[key] = block_map([self.params[i].numel() for i in group], program_values(bf16),
                                              self.params[0].device)
        states = [self._state(self.master_weights[i]) for i in group]
        tensors = {"param": [self.master_weights[i] for i in group],
                   "grad": [self.params[i].grad for i in group],
                   "exp_avg": [s["exp_avg"] for s in states], "exp_avg_sq": [s["exp_avg_sq"] for s in states],
                   "ema": [self.ema_params[i] for i in group], "step": [s["step"] for s in states],
                   "working": [self.params[i] for i in group]}
        # the same tensors as last step (gradients reused in place, as in a captured CUDA graph): same table
        addresses = tuple(x.data_ptr() for row in tensors.values() for x in row)
        if self._tables.get(bf16, (None,))[0] != addresses:
            self._tables[bf16] = (addresses, *pointer_table(tensors, working_bf16=bf16))
        hyper = self.optimizer.param_groups[0]
        adamw_ema_(self._tables[bf16][2], self._block_maps[key], tensors["step"], working_bf16=bf16,
                   lr=hyper["lr"], beta1=hyper["betas"][0], beta2=hyper["betas"][1], eps=hyper["eps"],
                   weight_decay=hyper["weight_decay"], ema_decay=self.ema_decay)

    def _state(self, master: torch.Tensor) -> dict:
        """The weight's AdamW state in torch's layout, created (zeros, step 0) on its first update."""
        state = self.optimizer.state[master]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        return state

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
