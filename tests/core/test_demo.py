"""The CPU demo: a shortened run trains LightningDiT-tiny/1 with the SFD loss and samples all three phases."""
from __future__ import annotations

import math

from sfd_core.config import load_config
from sfd_core.demo import DemoConfig, loss_summary, run


def test_short_demo_loss_falls_and_sampling_reports():
    cfg = load_config(DemoConfig, ["--set", "steps=40", "--set", "log_every=20", "--set", "sample_steps=6",
                                   "--set", "samples_per_class=4"])
    assert cfg.steps == 40
    result = run(cfg)
    history = result["loss_history"]
    assert len(history) == 40

    def window_mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    for key in ("loss", "mse", "repa"):
        assert window_mean(history[-10:], key) < 0.85 * window_mean(history[:10], key), key
    assert len(result["per_class"]) == cfg.num_classes
    for row in result["per_class"]:
        assert math.isfinite(row["generated"]) and row["noise"] > 0
    assert 0.0 <= result["nearest_mean_accuracy"] <= 1.0
    assert 0.5 < result["generated_std"] < 2.0  # samples are latents of the data's scale, not blown up


def test_loss_summary_slices_cover_every_step():
    history = [{"loss": float(i), "mse": 0.0, "cos": 0.0, "repa": 0.0} for i in range(1, 12)]
    rows = loss_summary(history, windows=5)
    assert rows[0]["first"] == 1 and rows[-1]["last"] == 11
    assert sum(r["last"] - r["first"] + 1 for r in rows) == 11
    assert rows[0]["loss"] == 2.0  # mean of 1, 2, 3


def test_module_entry_point_prints_the_loss_curve():
    import subprocess
    import sys
    import time

    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "sfd_core.demo", "--set", "steps=20", "--set", "log_every=10",
                          "--set", "sample_steps=4", "--set", "samples_per_class=2"],
                         capture_output=True, text=True, timeout=120, check=True)
    text = out.stdout + out.stderr
    assert "loss curve" in text and "nearest-class-mean accuracy" in text
    assert time.monotonic() - start < 60
