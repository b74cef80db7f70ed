"""Single-process behaviour of the torchrun helpers (multi-process paths run in test_train_sfd)."""
from __future__ import annotations

import os
import signal

import torch

from sfd_core import distributed as dist


def test_single_process_without_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = dist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device.type, info.is_main) == (0, 1, 0, "cpu", True)
    assert not dist.is_distributed() and dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    value = torch.tensor([1.5, -2.0])
    reduced = dist.all_reduce_mean(value)
    assert torch.equal(reduced, value) and reduced is not value
    assert dist.all_reduce_max(3.0) == 3.0
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.broadcast_object(5) == 5
    dist.barrier()
    dist.cleanup()


def test_seeding_offsets_by_rank():
    dist.seed_everything(7, rank_offset=0)
    a = torch.rand(3)
    dist.seed_everything(7, rank_offset=1)
    b = torch.rand(3)
    dist.seed_everything(7)
    assert torch.equal(torch.rand(3), a) and not torch.equal(a, b)


def test_stop_on_signal_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with dist.StopOnSignal() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.flag and stop.requested()
    assert signal.getsignal(signal.SIGTERM) is before
