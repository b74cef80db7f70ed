"""The AdamW + EMA update of a training step at model size: eager (torch's fused AdamW, then a multi-tensor EMA)
against the fused Triton kernel of ``sfd_core.kernels.adamw_ema`` (``AdamWWithEMA(fused=...)``).

Both update the real parameter list of the model (random init) from fixed random gradients. Reported per mode:
ms per update, effective bandwidth (the bytes each must move at the least: eager reads weight, gradient and both
moments and writes weight and moments, then reads EMA and weight and writes EMA, 40 B per fp32 weight; fused,
36 B) and its share of the measured device-to-device copy bandwidth of the same run, plus the speed-up and the
largest difference between the two modes' weights and EMAs after the timed updates (same start, same gradients).

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
from sfd_core.optim import AdamWWithEMA  # noqa: E402
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
    parser.add_argument("--configs", default="", metavar="BLOCK:WARPS:BLOCKS,...",
                        help="also time the fused kernel at these launch configurations (values per block, warps, "
                             "blocks per program), e.g. 2048:4:1,1024:4:8")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = build_model(args.model).to(device)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    numel = sum(p.numel() for p in params)
    bandwidth = copy_bandwidth(device, numel, args.reps)
    log(f"{args.model}: {len(params)} weights, {numel / 1e6:.1f} M values; copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    results, finals = {}, {}
    default_config = adamw_ema.CONFIG
    sweep = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",") if c]
    for mode, config in [("eager", None), ("fused", default_config)] + [("fused", c) for c in sweep]:
        adamw_ema.CONFIG = config or default_config
        model.load_state_dict(start)
        ema = copy.deepcopy(model).requires_grad_(False)
        update = AdamWWithEMA(params, [e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad],
                              lr=1e-4, fused=mode == "fused")
        for p, g in zip(params, grads):
            p.grad = g
        t0 = time.perf_counter()
        update.step()   # the first call compiles the kernel
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_s = time.perf_counter() - t0
        ms = median_ms(update.step, device, args.reps)
        achieved = BYTES_PER_WEIGHT[mode] * numel / (ms / 1e3)
        name = mode if config in (None, default_config) else "fused " + ":".join(map(str, config))
        results[name] = {"ms": ms, "launch_config": config, "first_call_s": first_s,
                         "min_bytes_per_weight": BYTES_PER_WEIGHT[mode], "gb_per_s": achieved / 1e9,
                         "of_copy_bandwidth": achieved / bandwidth}
        finals[name] = [t.detach().clone() for t in params + list(ema.parameters())]
        log(f"{name}: {ms:.2f} ms per update ({achieved / 1e9:.0f} GB/s, {achieved / bandwidth:.2f} of copy), "
            f"first call {first_s:.1f} s")
        del update, ema
    adamw_ema.CONFIG = default_config
    max_diff = max(float((a - b).abs().max()) for a, b in zip(finals["eager"], finals["fused"]))
    report = {"model": args.model, "device": str(device), "weights": len(params), "values": numel,
              "copy_gb_per_s": bandwidth / 1e9, "results": results,
              "speedup_fused_over_eager": results["eager"]["ms"] / results["fused"]["ms"],
              "max_abs_diff_eager_vs_fused": max_diff, "updates_compared": 2 + args.reps}
    print(f"\n| mode | ms/update | GB/s | of copy bandwidth |\n|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['ms']:.2f} | {r['gb_per_s']:.0f} | {r['of_copy_bandwidth']:.2f} |")
    print(f"\nspeed-up fused / eager: {report['speedup_fused_over_eager']:.2f}x; "
          f"max |eager - fused| after {2 + args.reps} updates: {max_diff:.2e}")
    write_json_report(report, "optimizer", args.json)
    return report


if __name__ == "__main__":
    main()
