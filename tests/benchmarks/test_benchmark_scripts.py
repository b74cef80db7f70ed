"""The GPU benchmark scripts still run: their CPU smoke modes end to end, rows and JSON as the device runs write."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.kernels import NORM_SWEEP, QKV_BACKWARD_SWEEP, QKV_FORWARD_SWEEP, TOKEN_SUMS_SWEEP
from sfd_core.kernels import TRITON_AVAILABLE

ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_step_measures_residual_streams_kernels_and_weights(tmp_path):
    out = tmp_path / "train_step.json"
    stdout = run_script("train_step.py", "--model", "LightningDiT-tiny/1", "--device", "cpu", "--steps", "1",
                        "--batch-sizes", "2", "--variants", "eager", "--residual", "fp32,bf16",
                        "--kernels", "stock,fused", "--weights", "fp32,bf16", "--sampler-variants", "none",
                        "--profile", "--set", "input_size=8", "--json", str(out))
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["variant"], r["residual"], r["kernels"], r["weights"], r["batch"]) for r in rows] == [
        ("eager", residual, kernels, weights, 2) for residual in ("fp32", "bf16") for kernels in ("stock", "fused")
        for weights in ("fp32", "bf16")]
    assert all(r["img_per_s"] > 0 and math.isfinite(r["loss"]) for r in rows)
    # The analytic FLOP count is the one the counter measures (XL/1: within 1e-4; this tiny model, 0.4%).
    assert abs(report["flops"]["train_ratio_counted_over_analytic"] - 1.0) < 1e-2
    assert all(r["update"] == "fused" for r in rows)   # the default: AdamWWithEMA(fused=True)
    assert "kernel profile: train eager, bf16 residual, fused kernels, fused update, bf16 weights, batch 2" in stdout


def test_train_step_graph_variants_need_cuda():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", "cpu",
                           "--variants", "step-graph"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "need a cuda device" in done.stderr


def test_kernels_benchmark_times_both_paths_and_the_sweep(tmp_path):
    out = tmp_path / "kernels.json"
    run_script("kernels.py", "--device", "cpu", "--batch", "1", "--tokens", "16", "--hidden", "48", "--heads", "2",
               "--mlp-hidden", "24", "--reps", "1", "--sweep", "--json", str(out))
    report = json.loads(out.read_text())
    assert [r["op"] for r in report["results"]] == ["qkv_norm_rope", "swiglu", "norm_modulate (block pair)"]
    assert all(r["fused_fwd_bwd_ms"] > 0 and r["stock_fwd_bwd_ms"] > 0 for r in report["results"])
    assert [r["pass"] for r in report["qkv_norm_rope_sweep"]] == ["forward"] * len(QKV_FORWARD_SWEEP) + [
        "backward"] * len(QKV_BACKWARD_SWEEP)
    assert len(report["swiglu_sweep"]) == 6
    assert [r["pass"] for r in report["norm_modulate_sweep"]] == ["forward"] * len(NORM_SWEEP) + ["backward"] * len(
        NORM_SWEEP) + ["token sums"] * len(TOKEN_SUMS_SWEEP)
    # the fastest launch of each pass, flattened the way train_step.py's flags take them
    fastest_qkv_backward = min((r for r in report["qkv_norm_rope_sweep"] if r["pass"] == "backward"),
                               key=lambda r: r["ms"])["config"]
    fastest_swiglu_forward = min(report["swiglu_sweep"], key=lambda r: r["fwd_ms"])["config"]
    best = report["best_launch"]
    assert best["qkv"][2:] == fastest_qkv_backward and best["swiglu"][:3] == fastest_swiglu_forward
    assert [len(best[op]) for op in ("qkv", "swiglu", "norm")] == [5, 6, 7]


def test_train_step_takes_the_launch_configs_of_a_kernels_report(tmp_path, monkeypatch):
    from benchmarks import train_step
    from benchmarks.kernels import LAUNCH_CONFIGS
    for module, names in LAUNCH_CONFIGS.values():
        for name in names:
            monkeypatch.setattr(module, name, getattr(module, name))   # restored after the test
    report = tmp_path / "kernels.json"
    report.write_text(json.dumps({"best_launch": {"qkv": [4, 8, 1, 4, 16], "swiglu": [8, 256, 4, 16, 128, 8],
                                                  "norm": [2, 4, 8, 8, 16, 32, 2]}}))
    args = train_step.parse_args(["--device", "cpu", "--launch-configs", str(report), "--swiglu-config",
                                  "1,64,2,2,64,4"])   # an explicit flag wins over the report
    train_step.set_kernel_launch_configs(args)
    assert train_step.launch_configs() == {"qkv": [4, 8, 1, 4, 16], "swiglu": [1, 64, 2, 2, 64, 4],
                                           "norm": [2, 4, 8, 8, 16, 32, 2]}


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton is not installed")
def test_fused_kernels_compile_for_hopper_without_spills_and_with_vector_accesses(tmp_path):
    """Each launch of the fused ops at XL/1 shapes, compiled for sm_90 by Triton's own ptxas (no GPU needed): the
    CPU tests run the kernels in Triton's interpreter, which never compiles them."""
    out = tmp_path / "kernel_sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run_script("kernel_sass.py", "--batch", "2", "--json", str(out), env=env)
    rows = json.loads(out.read_text())["results"]
    assert [r["kernel"] for r in rows] == [
        "qkv_norm_rope_fwd_kernel", "qkv_norm_rope_bwd_kernel", "swiglu_fwd_kernel", "swiglu_bwd_kernel",
        "norm_modulate_fwd_kernel", "norm_modulate_fwd_kernel", "norm_modulate_bwd_kernel", "token_sums_kernel",
        "adamw_ema_kernel"]
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["spill_store_bytes"] == r["spill_load_bytes"] == 0, r
        # the activations move in 16-byte vectors per thread (a lost alignment or contiguity proof shows here);
        # the token sums write only a few fp32 sums per program
        assert r["global load widths"].get("128", 0) > 0, r
        assert r["kernel"] == "token_sums_kernel" or r["global store widths"].get("128", 0) > 0, r


def test_attention_benchmark_times_each_head_dim(tmp_path):
    out = tmp_path / "attention.json"
    run_script("attention.py", "--device", "cpu", "--batch", "1", "--tokens", "16", "--heads", "2",
               "--head-dims", "8,16", "--reps", "1", "--json", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [(r["head_dim"], r["backend"]) for r in rows] == [(8, "math"), (16, "math")]
    assert all(r["fwd_bwd_ms"] > r["fwd_ms"] > 0 for r in rows)


def test_extraction_smoke_compares_with_strict_fp32(tmp_path):
    out = tmp_path / "extraction.json"
    run_script("extraction.py", "--smoke", "--encoders", "texture", "--json", str(out))
    (row,) = json.loads(out.read_text())["results"]
    assert row["encoder"] == "texture_vae_f16d32" and row["speedup"] > 0
    # bf16 against strict fp32: close, but not identical (the fast path really ran in bf16).
    for diffs in row["accuracy_vs_fp32"].values():
        assert 0 < diffs["max_rel"] < 0.05


def test_optimizer_benchmark_compares_the_update_paths_per_weight_dtype(tmp_path):
    out = tmp_path / "optimizer.json"
    stdout = run_script("optimizer.py", "--model", "LightningDiT-tiny/1", "--device", "cpu", "--reps", "1",
                        "--weights", "fp32,bf16", "--configs", "4096:4:1", "--json", str(out))
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["eager, fp32 weights", "fused, fp32 weights", "eager, bf16 weights",
                                       "fused, bf16 weights", "fused, fp32 weights 4096:4:1"]
    assert all(r["ms"] > 0 and r["of_copy_bandwidth"] > 0 for r in report["results"].values())
    # same start, same gradients: both paths end at the same masters and EMAs
    assert all(c["max_abs_diff_eager_vs_fused"] < 1e-5 for c in report["comparisons"].values())
    assert "bf16 weights: speed-up fused / eager" in stdout
