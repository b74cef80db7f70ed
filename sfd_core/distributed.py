"""Process-group helpers for programs launched by ``torchrun`` (or plainly, as one process).

``init_distributed()`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
joins the group with NCCL on CUDA or gloo on CPU. Without that environment, or with WORLD_SIZE=1, nothing is
initialised and every collective below degrades to a no-op, so the same program runs single-process.
"""
from __future__ import annotations

import datetime
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from sfd_core.reporting import log

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group (once) and pick this rank's device.

    ``device``: "cuda", "cpu" or None (CUDA when available). On CUDA each rank uses ``cuda:LOCAL_RANK``.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def run_in_process_group(device: str | None, body: Callable[[DistInfo], T]) -> T:
    """``body(info)`` inside the torchrun process group (or a single process), always leaving the group after."""
    info = init_distributed(device)
    try:
        return body(info)
    finally:
        cleanup()


def main_until_interrupted(stage: str, body: Callable[[], Any]) -> None:
    """A trainer's ``main``: run ``body``; a stop signal (checkpoint already written) exits with status 130."""
    try:
        body()
    except TrainingInterrupted as stopped:
        log(f"{stage}: {stopped}")
        sys.exit(130)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def seed_everything(seed: int, rank_offset: int = 0) -> int:
    """Seed python, numpy and torch (all devices) with ``seed + rank_offset``; returns the seed used.

    Pass the rank as ``rank_offset`` when ranks must draw different numbers from the global generators."""
    value = int(seed) + int(rank_offset)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # also seeds every CUDA device
    return value


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor; the input is left untouched)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_reduce_max(value: float, device: torch.device | str = "cpu") -> float:
    """Largest ``value`` over ranks (used to agree on flags such as 'stop requested')."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` single-process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


class TrainingInterrupted(RuntimeError):
    """A stop signal arrived; a checkpoint was written and the run can be resumed."""


class StopOnSignal:
    """While active, SIGTERM/SIGINT only raise a flag, so a training loop can checkpoint and exit cleanly
    (torchrun and Dagster forward these signals to every rank). ``requested()`` agrees across ranks."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.flag = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.flag = True

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank when any rank got a stop signal (a collective: call it on all ranks together)."""
        return all_reduce_max(1.0 if self.flag else 0.0, device) > 0
