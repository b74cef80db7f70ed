"""SFD trainer: recipes, FLOPs, DDP equivalence, kill/resume and stop-signal behaviour on tiny CPU runs."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from train_helpers import make_dino_stage, make_semantic_stage, make_texture_stage, run_ranks, start_program
from sfd_core import reporting
from sfd_core.config import ConfigError
from sfd_core.models import build_model, model_config
from sfd_core.distributed import TrainingInterrupted
from sfd_core.train_sfd import Config, SFDTrainer, main, resolve_config, run, train_flops_per_image
from sfd_core.train_state import COMPLETE, EMA_FILE, MODEL_FILE, complete_steps, read_weights
from storage import fs



@pytest.fixture
def stages(tmp_path):
    return dict(texture_url=make_texture_stage(str(tmp_path / "tex")),
                semantic_url=make_semantic_stage(str(tmp_path / "sem")),
                dino_url=make_dino_stage(str(tmp_path / "dino")))


def tiny_config(out_url: str, stages: dict, **changes) -> Config:
    base = Config(out_url=out_url, model="LightningDiT-tiny/1", model_overrides={"num_classes": 5},
                  global_batch=8, max_steps=6, ckpt_every=3, keep_last=1, log_every=2, loader_workers=0,
                  shuffle_window=16, device="cpu", tensorboard=False, **stages)
    return dataclasses.replace(base, **changes)


def final_weights(manifest: dict) -> tuple[dict, dict]:
    return read_weights(manifest["artifacts"]["model"]), read_weights(manifest["artifacts"]["ema"])


def test_recipes_fill_unset_fields_only():
    ablation = resolve_config(Config(out_url="o", texture_url="t", semantic_url="s", dino_url="d",
                                     recipe="ablation_80ep"))
    assert (ablation.lr, ablation.betas, ablation.repa_weight, ablation.repa_type) == (2e-4, (0.9, 0.95), 0.5,
                                                                                        "cos_mse")
    assert ablation.model == "LightningDiT-XL/1" and ablation.weight_decay == 0.0 and ablation.max_steps == 400_000
    main = resolve_config(Config(out_url="o", texture_url="t", semantic_url="s", dino_url="d", lr=3e-4))
    assert (main.lr, main.betas, main.repa_weight, main.repa_type) == (3e-4, (0.9, 0.999), 1.0, "cos")
    assert resolve_config(Config(out_url="o", texture_url="t", semantic_url="s", dino_url="d",
                                 recipe="autoguidance_b")).model == "LightningDiT-B/1"
    with pytest.raises(ConfigError, match="recipe"):
        resolve_config(Config(out_url="o", texture_url="t", semantic_url="s", recipe="nope"))
    with pytest.raises(ConfigError, match="dino_url"):
        resolve_config(Config(out_url="o", texture_url="t", semantic_url="s"))


def test_flops_formula_matches_flop_counter():
    kwargs = model_config("LightningDiT-tiny/1", input_size=8, in_channels=6, semantic_channels=2)
    model = build_model("LightningDiT-tiny/1", input_size=8, in_channels=6, semantic_channels=2).train()
    x, t = torch.randn(1, 6, 8, 8), (torch.rand(1), torch.rand(1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # attention as matmuls
        model(x, t, torch.tensor([1]), drop_labels=torch.tensor([False]))
    assert train_flops_per_image(kwargs) == 3 * counter.get_total_flops()


def test_train_step_is_adamw_then_the_ema_of_the_updated_weights():
    cfg = resolve_config(Config(out_url="o", texture_url="t", semantic_url="s", dino_url="d", ema_decay=0.9,
                                model="LightningDiT-tiny/1"))
    kwargs = dict(input_size=8, in_channels=6, semantic_channels=2)
    trainer = SFDTrainer(cfg, kwargs, torch.device("cpu"), distributed=False)
    before = [p.detach().clone() for p in trainer.params]
    dim = model_config("LightningDiT-tiny/1")["repa_out_dim"]
    batch = (torch.randn(4, 6, 8, 8), torch.randint(0, 1000, (4,)), torch.randn(4, dim, 8, 8))   # patch 1
    terms = trainer.train_step([batch], [torch.Generator().manual_seed(0)])
    assert torch.isfinite(terms).all()
    trained = {id(p) for p in trainer.params}
    emas = [e for p, e in zip(trainer.model.parameters(), trainer.ema.parameters()) if id(p) in trained]
    assert any(not torch.equal(p, b) for p, b in zip(trainer.params, before))
    for param, ema, start in zip(trainer.params, emas, before):   # the EMA started at the initial weights
        torch.testing.assert_close(ema, start + 0.1 * (param.detach() - start), rtol=1e-6, atol=1e-7)
    assert all(float(trainer.optimizer.state[p]["step"]) == 1.0 for p in trainer.params)
    assert all(p.grad is not None for p in trainer.params)   # kept until the next step (grad norm logging)


def test_two_processes_match_one_process(tmp_path, stages, single_thread):
    one = run(tiny_config(str(tmp_path / "one"), stages, data_streams=2, max_steps=4, ckpt_every=4))
    cfg = tiny_config(str(tmp_path / "two"), stages, data_streams=2, max_steps=4, ckpt_every=4)
    assert run_ranks(main, cfg) == [0, 0]
    two = json.loads(Path(tmp_path / "two" / "_SUCCESS.json").read_text())
    for a, b in zip(final_weights(one), final_weights(two)):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
    # Training moved the weights (the comparison above is not between two untouched inits).
    init = build_model("LightningDiT-tiny/1", **one["model"]["overrides"]).state_dict()
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], final_weights(one)[0]["blocks.0.attn.qkv.weight"])
    assert one["metrics"]["loss_curve"]["values"] == pytest.approx(two["metrics"]["loss_curve"]["values"],
                                                                   abs=1e-5)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, stages, single_thread):
    steps = 40
    reference = run(tiny_config(str(tmp_path / "ref"), stages, max_steps=steps, ckpt_every=2))
    out = tmp_path / "killed"
    cfg = tiny_config(str(out), stages, max_steps=steps, ckpt_every=2)
    child = start_program(main, cfg)
    deadline = time.monotonic() + 120
    while not complete_steps(str(out / "checkpoints")) and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL, "the child was not killed mid-run"
    reached = complete_steps(str(out / "checkpoints"))
    assert reached and reached[-1] < steps and not (out / "_SUCCESS.json").exists()

    resumed = run(cfg)
    for a, b in zip(final_weights(reference), final_weights(resumed)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"]["loss_curve"] == reference["metrics"]["loss_curve"]
    assert resumed["counts"]["steps"] == steps


class _SignalAt(reporting.Reporter):
    """Sends this process SIGTERM when a metric line for ``step`` is reported (as torchrun/Dagster would)."""

    def __init__(self, step: int):
        self.step = step

    def metric(self, step, values):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_stop_signal_checkpoints_and_exits(tmp_path, stages, single_thread):
    cfg = tiny_config(str(tmp_path / "out"), stages, max_steps=30, ckpt_every=100, log_every=2)
    previous = reporting.get_reporter()
    reporting.set_reporter(_SignalAt(4))
    try:
        with pytest.raises(TrainingInterrupted):
            run(cfg)
    finally:
        reporting.set_reporter(previous)
    # Checked every 10 steps: the run stops at step 10 with a complete checkpoint and no manifest.
    assert complete_steps(str(tmp_path / "out" / "checkpoints")) == [10]
    assert not fs.exists(str(tmp_path / "out" / "_SUCCESS.json"))
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_manifest_describes_a_loadable_model(tmp_path, stages, single_thread):
    manifest = run(tiny_config(str(tmp_path / "out"), stages, tensorboard=True))
    assert manifest["stage"] == "sfd_model" and manifest["counts"]["steps"] == 6
    assert all(fs.exists(url) for url in manifest["artifacts"].values())
    assert complete_steps(str(tmp_path / "out" / "checkpoints")) == [6]  # keep_last=1 retired step 3
    committed = fs.read_json(fs.join(manifest["artifacts"]["checkpoint"], COMPLETE))
    assert committed["model"] == {k: manifest["model"][k] for k in ("name", "overrides")}
    assert (committed["delta_t"], committed["latent_multiplier"], committed["step"]) == (0.3, 1.0, 6)
    model = build_model(manifest["model"]["name"], **manifest["model"]["overrides"])
    model.load_state_dict(read_weights(manifest["artifacts"]["ema"]))
    assert len(manifest["stats"]["texture"]["mean"]) == 4 and len(manifest["stats"]["semantic"]["std"]) == 2
    assert manifest["upstream"] == {"texture_latents": "tex", "semantic_latents": "sem", "dinov2_features": "dino"}
    # A second call is a cache hit that returns the same manifest.
    assert run(tiny_config(str(tmp_path / "out"), stages)) == manifest
    # EMA differs from the raw weights after training, and both are finite.
    raw, ema = read_weights(manifest["artifacts"]["model"]), read_weights(manifest["artifacts"]["ema"])
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert all(torch.isfinite(v).all() for v in raw.values())
    assert Path(manifest["artifacts"]["tensorboard"]).is_dir()
    assert MODEL_FILE in manifest["artifacts"]["model"] and EMA_FILE in manifest["artifacts"]["ema"]
