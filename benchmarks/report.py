"""Benchmark output: where a benchmark's JSON goes (``--json PATH`` if given, else ``$OUT/<name>.json``, the device
tool's output folder, else nowhere) and a kernel profile of a step (where its device time goes)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_report(report: dict[str, Any], name: str, explicit_path: str | None = None) -> str | None:
    out = explicit_path or (os.path.join(os.environ["OUT"], f"{name}.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}", flush=True)
    return out


def print_kernel_profile(step, device: torch.device, title: str, steps: int = 3, top: int = 25) -> None:
    """Where the device time of a few steps goes: the top kernels and a coarse split by kernel family."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA] \
        if device.type == "cuda" else list(prof.key_averages())
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    # first match wins: cuDNN attention kernel names contain "sm90" too
    families = {"sfd kernels": ("qkv_norm_rope", "swiglu", "norm_modulate"),
                "attention": ("flash", "fmha", "attention", "sdpa", "cudnn::fusion"),
                "gemm": ("gemm", "cutlass", "sm90", "nvjet", "cublas", "mm_"),
                "optimizer": ("adam", "foreach", "lerp", "multi_tensor"), "triton": ("triton",)}
    split = dict.fromkeys(list(families) + ["other"], 0.0)
    for e in events:
        name = e.key.lower()
        fam = next((f for f, keys in families.items() if any(k in name for k in keys)), "other")
        split[fam] += getattr(e, attr)
    print(f"\n#### kernel profile: {title} ({steps} steps, {total / steps / 1e3:.1f} ms device time per step)")
    print(" | ".join(f"{f} {100 * v / total:.1f}%" for f, v in split.items()))
    for e in events[:top]:
        print(f"{100 * getattr(e, attr) / total:5.1f}%  {getattr(e, attr) / steps / 1e3:7.2f} ms/step  "
              f"x{e.count // steps:<4d} {e.key[:110]}")
