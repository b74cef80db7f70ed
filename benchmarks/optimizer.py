"""The AdamW + EMA update of a training step at model size: eager (torch's fused AdamW, then a multi-tensor EMA)
against the fused Triton kernel of ``sfd_core.kernels.adamw_ema`` (``AdamWWithEMA(fused=...)``).

Both update the real parameter list of the model (random init) from fixed random gradients, with fp32 weights
and (``--weights fp32,bf16``) with bf16 working copies of the linear/conv weights over fp32 masters, as the
training step runs them. Reported per mode: ms per update, effective bandwidth (the bytes each must move at the
least: eager reads weight, gradient and both moments and writes weight and moments, then reads EMA and weight
and writes EMA, 40 B per fp32 weight; fused, 36 B, also with bf16 weights: a 2 B gradient read and a 2 B copy
written) and its share of the measured device-to-device copy bandwidth of the same run, plus the speed-up and
the largest difference between the two modes' masters and EMAs after the timed updates (same start, same
gradients).

    python benchmarks/optimizer.py                                   # XL/1 on cuda
    python benchmarks/optimizer.py --model LightningDiT-tiny/1 --device cpu --reps 2   # smoke run

Writes JSON to $OUT/optimizer.json when OUT is set (or to --json).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernels import median_ms  # noqa: E402
from benchmarks.report import write_json_report  # noqa: E402
from sfd_core.kernels import adamw_ema  # noqa: E402
from sfd_core.models import build_model  # noqa: E402
from sfd_core.optim import AdamWWithEMA, autocast_weights  # noqa: E402
from sfd_core.reporting import log  # noqa: E402

BYTES_PER_WEIGHT = {"eager": 4 * (4 + 3) + 4 * 3, "fused": 4 * (5 + 4)}


def copy_bandwidth(device: torch.device, numel: int, reps: int) -> float:
    """Bytes per second of a device-to-device copy (read + write) of ``numel`` fp32 values."""
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * 4 * numel / (median_ms(lambda: dst.copy_(src), device, reps) / 1e3)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="LightningDiT-XL/1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--weights", default="fp32", help="comma list of fp32, bf16 (working copies)")
    parser.add_argument("--configs", default="", metavar="BLOCK:WARPS:BLOCKS,...",
                        help="also time the fused kernel at these launch configurations (values per block, warps, "
                             "blocks per program) with the first of --weights, e.g. 2048:4:1,1024:4:8")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    weight_modes = [w for w in args.weights.split(",") if w]
    if set(weight_modes) - {"fp32", "bf16"}:
        parser.error(f"--weights takes fp32 and/or bf16, not {args.weights!r}")

    torch.manual_seed(0)
    model = build_model(args.model).to(device)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters() if p.requires_grad]
    numel = sum(g.numel() for g in grads)
    bandwidth = copy_bandwidth(device, numel, args.reps)
    log(f"{args.model}: {len(grads)} weights, {numel / 1e6:.1f} M values; copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    results, finals = {}, {}
    default_configs = dict(adamw_ema.CONFIGS)
    sweep = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",") if c]
    runs = [(mode, weights, None) for weights in weight_modes for mode in ("eager", "fused")]
    runs += [("fused", weight_modes[0], c) for c in sweep]
    for mode, weights, config in runs:
        adamw_ema.CONFIGS = {**default_configs, weights == "bf16": config or default_configs[weights == "bf16"]}
        del model
        model = build_model(args.model).to(device)   # fresh fp32 weights: bf16_weights converts them in place
        model.load_state_dict(start)
        ema = copy.deepcopy(model).requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        update = AdamWWithEMA(params, [e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad],
                              lr=1e-4, fused=mode == "fused",
                              bf16_weights=autocast_weights(model) if weights == "bf16" else ())
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        t0 = time.perf_counter()
        update.step()   # the first call compiles the kernel
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_s = time.perf_counter() - t0
        ms = median_ms(update.step, device, args.reps)
        achieved = BYTES_PER_WEIGHT[mode] * numel / (ms / 1e3)
        name = f"{mode}, {weights} weights" + ("" if config is None else " " + ":".join(map(str, config)))
        results[name] = {"ms": ms, "update": mode, "weights": weights, "first_call_s": first_s,
                         "launch_config": adamw_ema.CONFIGS[weights == "bf16"] if mode == "fused" else None,
                         "min_bytes_per_weight": BYTES_PER_WEIGHT[mode], "gb_per_s": achieved / 1e9,
                         "of_copy_bandwidth": achieved / bandwidth}
        finals[name] = [t.detach().clone() for t in update.master_weights + list(ema.parameters())]
        log(f"{name}: {ms:.2f} ms per update ({achieved / 1e9:.0f} GB/s, {achieved / bandwidth:.2f} of copy), "
            f"first call {first_s:.1f} s")
        del update, ema, params
    adamw_ema.CONFIGS = default_configs
    comparisons = {}
    for weights in weight_modes:
        eager, fused = finals[f"eager, {weights} weights"], finals[f"fused, {weights} weights"]
        comparisons[weights] = {
            "speedup_fused_over_eager": results[f"eager, {weights} weights"]["ms"]
            / results[f"fused, {weights} weights"]["ms"],
            "max_abs_diff_eager_vs_fused": max(float((a - b).abs().max()) for a, b in zip(eager, fused))}
    report = {"model": args.model, "device": str(device), "weights": len(grads), "values": numel,
              "copy_gb_per_s": bandwidth / 1e9, "results": results, "comparisons": comparisons,
              "updates_compared": 2 + args.reps}
    print("\n| mode | ms/update | GB/s | of copy bandwidth |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ms']:.2f} | {r['gb_per_s']:.0f} | {r['of_copy_bandwidth']:.2f} |")
    for weights, c in comparisons.items():
        print(f"\n{weights} weights: speed-up fused / eager {c['speedup_fused_over_eager']:.2f}x; max |eager - fused| "
              f"of masters and EMAs after {2 + args.reps} updates: {c['max_abs_diff_eager_vs_fused']:.2e}")
    write_json_report(report, "optimizer", args.json)
    return report


if __name__ == "__main__":
    main()
