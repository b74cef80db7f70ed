"""Checkpoint folders: commit marker, newest complete, half-written folders, retention, RNG and run state."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from sfd_core.train_state import (COMPLETE, EMA_FILE, MODEL_FILE, STATE_FILE, LossCurve, MetricWindow,
                                  StreamGenerators, apply_retention, capture_rng_state, checkpoint_url,
                                  clean_incomplete, complete_steps, latest_complete, load_model_weights, load_state,
                                  restore_rng_state, save_checkpoint, steps_to_keep)
from storage import fs


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


@pytest.mark.parametrize("root", ["local", "memory"])
def test_save_then_load_round_trip(tmp_path, root):
    ckpt_dir = str(tmp_path / "ckpt") if root == "local" else f"memory://ckpt-test-{tmp_path.name}"
    model, ema = tiny_model(0), tiny_model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    state = {"step": 7, "optimizer": optimizer.state_dict(), "data": {"epoch": 1, "position": 3},
             "rng": capture_rng_state()}
    url = save_checkpoint(ckpt_dir, 7, model, state, ema=ema, info={"epoch": 1})
    assert url == checkpoint_url(ckpt_dir, 7) and fs.basename(url) == "step_0000007"
    assert {fs.basename(u) for u in fs.ls(url)} == {MODEL_FILE, EMA_FILE, STATE_FILE, COMPLETE}
    assert fs.read_json(fs.join(url, COMPLETE))["step"] == 7
    assert latest_complete(ckpt_dir) == url

    restored, restored_ema = load_model_weights(tiny_model(5), url), load_model_weights(tiny_model(5), url, EMA_FILE)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), restored_ema.state_dict().values()))
    loaded = load_state(url)  # weights_only: plain values and tensors only
    assert loaded["step"] == 7 and loaded["data"] == {"epoch": 1, "position": 3}
    fresh = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_half_written_folder_is_ignored_and_cleaned(tmp_path):
    ckpt_dir = str(tmp_path)
    save_checkpoint(ckpt_dir, 10, tiny_model(0), {"step": 10})
    partial = checkpoint_url(ckpt_dir, 20)
    fs.write_bytes(fs.join(partial, MODEL_FILE), b"truncated")  # died before state.pt and the marker
    fs.write_bytes(fs.join(ckpt_dir, "notes.txt"), b"not a checkpoint")
    assert complete_steps(ckpt_dir) == [10]
    assert latest_complete(ckpt_dir) == checkpoint_url(ckpt_dir, 10)
    assert clean_incomplete(ckpt_dir) == [20]
    assert not fs.exists(partial) and fs.exists(fs.join(ckpt_dir, "notes.txt"))
    # Saving a step again replaces whatever an earlier attempt left there.
    fs.write_bytes(fs.join(checkpoint_url(ckpt_dir, 30), "stale.bin"), b"x")
    url = save_checkpoint(ckpt_dir, 30, tiny_model(0), {"step": 30})
    assert "stale.bin" not in {fs.basename(u) for u in fs.ls(url)}


def test_retention_keeps_last_k_and_every_mth(tmp_path):
    assert steps_to_keep(list(range(1, 11)), keep_last=2, keep_every=4) == {4, 8, 9, 10}
    assert steps_to_keep([3, 5], keep_last=1, keep_every=0) == {5}
    with pytest.raises(ValueError):
        steps_to_keep([1], keep_last=0, keep_every=0)
    ckpt_dir = str(tmp_path)
    for step in (2, 4, 6, 8, 10):
        save_checkpoint(ckpt_dir, step, tiny_model(0), {"step": step})
    assert apply_retention(ckpt_dir, keep_last=2, keep_every=4) == [2, 6]
    assert complete_steps(ckpt_dir) == [4, 8, 10]
    assert sorted(fs.basename(u) for u in fs.ls(ckpt_dir)) == ["step_0000004", "step_0000008", "step_0000010"]


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    random.random(), np.random.rand(5), torch.rand(5)
    restore_rng_state(state)
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert torch.equal(torch.rand(3), expected[2])


def test_stream_generators_and_metric_window_resume():
    generators = StreamGenerators(seed=1, streams=range(2, 4))
    saved = generators.gather_state()
    first = [torch.rand(2, generator=g) for g in generators.ordered()]
    other = StreamGenerators(seed=99, streams=[3])  # another rank layout picks its own stream's state
    other.restore(saved, rank=0, world_size=5)
    assert torch.equal(torch.rand(2, generator=other.ordered()[0]), first[1])
    assert not torch.equal(first[0], first[1])

    window = MetricWindow(2)
    window.add(torch.tensor([1.0, 2.0]))
    resumed = MetricWindow(2)
    resumed.load_state_dict(window.state_dict())
    for w in (window, resumed):
        w.add(torch.tensor([3.0, 6.0]))
    assert window.reduce() == resumed.reduce() == [2.0, 4.0]
    assert window.count == 0


def test_loss_curve_summary_thins_and_round_trips():
    curve = LossCurve()
    for step in range(1, 1001):
        curve.record(step, 1.0 / step)
    summary = curve.summary(max_points=100)
    assert summary["points"] == 1000 and summary["first"] == 1.0 and summary["last"] == summary["min"] == 1e-3
    assert len(summary["steps"]) <= 101 and summary["steps"][0] == 1 and summary["steps"][-1] == 1000
    copy = LossCurve()
    copy.load_state_dict(curve.state_dict())
    assert copy.summary() == curve.summary()
