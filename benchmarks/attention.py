"""SDPA backends at the LightningDiT attention shape: forward and forward+backward time per head dimension.

XL/1 attends over N = 256 tokens with 16 heads of 72 channels. This times each available backend (cuDNN, flash,
memory-efficient, and FlexAttention compiled) at that shape and at neighbouring head dims, to show what the
non-power-of-two 72 costs and whether zero-padding q, k, v to a wider head (which leaves the result unchanged with
the softmax scale kept at 1/sqrt(72)) would pay for its copies.

    python benchmarks/attention.py                     # batch 128 on cuda
    python benchmarks/attention.py --device cpu --batch 1 --tokens 16 --heads 2 --head-dims 8 --reps 1  # smoke

Writes JSON to $OUT/attention.json when OUT is set (or to --json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernels import fwd_and_fwd_bwd_ms  # noqa: E402
from benchmarks.report import write_json_report  # noqa: E402
from sfd_core.reporting import log  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_flops(batch: int, heads: int, tokens: int, head_dim: int) -> float:
    """Forward matmul FLOPs (QK^T and PV); the backward is 2.5x that with recomputation of P."""
    return 4.0 * batch * heads * tokens * tokens * head_dim


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dims", default="64,72,80,96,128")
    parser.add_argument("--model-head-dim", type=int, default=72, help="the softmax scale of every row")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale = args.model_head_dim ** -0.5
    backends = dict(BACKENDS) if device.type == "cuda" else {"math": SDPBackend.MATH}
    rows = []
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        q, k, v = (torch.randn(args.batch, args.heads, args.tokens, head_dim, device=device, dtype=dtype)
                   .requires_grad_() for _ in range(3))
        candidates = {name: (lambda b: lambda q, k, v: _sdpa(q, k, v, b, scale))(backend)
                      for name, backend in backends.items()}
        if device.type == "cuda":
            from torch.nn.attention.flex_attention import flex_attention
            flex = torch.compile(flex_attention)
            candidates["flex"] = lambda q, k, v: flex(q, k, v, scale=scale)
        for name, fn in candidates.items():
            try:
                fwd, fwd_bwd = fwd_and_fwd_bwd_ms(lambda: fn(q, k, v), (q, k, v), lambda out: torch.ones_like(out),
                                                  device, args.reps)
            except (RuntimeError, torch._dynamo.exc.BackendCompilerFailed) as exc:   # backend refuses the shape
                log(f"head dim {head_dim}, {name}: unavailable ({str(exc).splitlines()[0][:120]})")
                continue
            flops = attention_flops(args.batch, args.heads, args.tokens, args.model_head_dim)
            rows.append({"head_dim": head_dim, "backend": name, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
                         "model_tflops_fwd_bwd": 3.5 * flops / (fwd_bwd * 1e-3) / 1e12})
            log(f"head dim {head_dim}, {name}: fwd {fwd:.3f} ms, fwd+bwd {fwd_bwd:.3f} ms")
    print(f"\n### attention, batch {args.batch} x {args.heads} heads x {args.tokens} tokens "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}); TFLOP/s counts the "
          f"model's head dim {args.model_head_dim}\n")
    print("| head dim | backend | fwd ms | fwd+bwd ms | model TFLOP/s (fwd+bwd) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head_dim']} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
              f"{r['model_tflops_fwd_bwd']:.0f} |")
    report = {"device": str(device), "torch": torch.__version__, "batch": args.batch, "tokens": args.tokens,
              "heads": args.heads, "results": rows}
    write_json_report(report, "attention", args.json)
    return report


def _sdpa(q, k, v, backend, scale):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


if __name__ == "__main__":
    main()
