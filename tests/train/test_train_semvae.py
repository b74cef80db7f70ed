"""SemVAE trainer: LR schedule, learning on structured features, exact resume from a checkpoint folder."""
from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

from train_helpers import make_dino_stage, run_ranks
from sfd_core.semvae import load_semvae
from sfd_core.train_semvae import Config, lr_factor, main, run
from sfd_core.train_state import MODEL_FILE, complete_steps, read_weights
from storage import fs

TINY_ARCH = dict(hidden_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, latent_channels=4)


def tiny_config(out_url: str, features_url: str, **changes) -> Config:
    base = Config(out_url=out_url, features_url=features_url, arch=TINY_ARCH, lr=2e-3, batch_size=8,
                  max_steps=6, warmup_steps=2, constant_steps=2, eval_every=3, eval_samples=8, eval_batch_size=4,
                  ckpt_every=3, keep_last=5, log_every=1, loader_workers=0, shuffle_window=16, device="cpu")
    return dataclasses.replace(base, **changes)


def test_lr_schedule_warmup_constant_cosine():
    cfg = Config(max_steps=1_000_000)  # official: 500 warmup from 0.01, 800k constant, cosine to 0.1
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(250, cfg) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(500, cfg) == lr_factor(800_499, cfg) == 1.0
    halfway = 800_500 + 199_500 // 2
    expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (199_500 // 2) / 199_500))
    assert lr_factor(halfway, cfg) == pytest.approx(expected)
    assert lr_factor(1_000_000, cfg) == pytest.approx(0.1)


def test_loss_falls_on_structured_features(tmp_path, single_thread):
    features = make_dino_stage(str(tmp_path / "dino"), n=72, dim=16, grid=4)
    manifest = run(tiny_config(str(tmp_path / "out"), features, max_steps=80, constant_steps=100, eval_every=40,
                               log_every=10, ckpt_every=80))
    curve = manifest["metrics"]["loss_curve"]
    assert curve["last"] < 0.5 * curve["first"], curve
    first_eval, last_eval = manifest["metrics"]["evals"][0], manifest["metrics"]["evals"][-1]
    assert last_eval["eval_mse"] < first_eval["eval_mse"]
    assert last_eval["eval_cosine"] > first_eval["eval_cosine"]
    assert manifest["counts"] == {"steps": 80, "train_samples": 64, "eval_samples": 8}


def test_resume_from_checkpoint_folder_equals_uninterrupted(tmp_path, single_thread):
    features = make_dino_stage(str(tmp_path / "dino"))
    reference = run(tiny_config(str(tmp_path / "ref"), features))
    assert complete_steps(str(tmp_path / "ref" / "checkpoints")) == [3, 6]

    # The state a crash right after step 3's checkpoint leaves behind, plus a half-written step-6 folder.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step_0000003", crashed / "checkpoints" / "step_0000003")
    partial = crashed / "checkpoints" / "step_0000006"
    partial.mkdir()
    shutil.copy(tmp_path / "ref" / "checkpoints" / "step_0000006" / MODEL_FILE, partial / MODEL_FILE)

    resumed = run(tiny_config(str(crashed), features))
    assert resumed["metrics"]["loss_curve"] == reference["metrics"]["loss_curve"]
    assert resumed["metrics"]["evals"] == reference["metrics"]["evals"]
    final, expected = read_weights(resumed["artifacts"]["weights"]), read_weights(reference["artifacts"]["weights"])
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)

    model = load_semvae(resumed["artifacts"]["weights"])
    assert model.config == {**TINY_ARCH, "input_dim": 16, "grid": 4}
    assert fs.read_json(resumed["artifacts"]["config"]) == model.config
    # The training weights moved away from a fresh init with the same seed.
    assert not torch.equal(final["encoder.0.weight"], read_weights(
        str(tmp_path / "ref" / "checkpoints" / "step_0000003" / MODEL_FILE))["encoder.0.weight"])


def test_two_processes_match_one_process(tmp_path, single_thread):
    features = make_dino_stage(str(tmp_path / "dino"))
    one = run(tiny_config(str(tmp_path / "one"), features, data_streams=2))
    assert run_ranks(main, tiny_config(str(tmp_path / "two"), features, data_streams=2)) == [0, 0]
    two = fs.read_json(str(tmp_path / "two" / "_SUCCESS.json"))
    a, b = read_weights(one["artifacts"]["weights"]), read_weights(two["artifacts"]["weights"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
    for got, expected in zip(two["metrics"]["evals"], one["metrics"]["evals"], strict=True):
        assert got == pytest.approx(expected, rel=1e-5)
