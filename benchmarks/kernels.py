"""The fused Triton kernels of sfd_core.kernels against the stock modules compiled by Inductor, at model shapes.

For each op: forward and forward+backward time of the stock path (``torch.compile`` of the unfused module code,
what the compiled training step runs without ``fused_kernels``) and of the fused op, the speed-up, and the fused
kernels' effective memory bandwidth (bytes that must move / time). ``--sweep`` also times launch configurations
of the ops (rows / columns per program, warps; the defaults in their modules come from this sweep).

    python benchmarks/kernels.py                          # XL/1 shapes at batch 128 on cuda
    python benchmarks/kernels.py --device cpu --batch 2 --tokens 16 --hidden 48 --heads 2 --reps 1  # smoke run

Writes JSON to $OUT/kernels.json when OUT is set (or to --json).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_json_report  # noqa: E402
from sfd_core.kernels import norm_modulate as norm_module  # noqa: E402
from sfd_core.kernels import qkv_norm_rope as qkv_module  # noqa: E402
from sfd_core.kernels import swiglu as swiglu_module  # noqa: E402
from sfd_core.kernels.norm_modulate import norm_modulate, residual_norm_modulate  # noqa: E402
from sfd_core.kernels.qkv_norm_rope import qkv_norm_rope  # noqa: E402
from sfd_core.kernels.swiglu import swiglu  # noqa: E402
from sfd_core.models.layers import RMSNorm, modulate  # noqa: E402
from sfd_core.models.rope import VisionRotaryEmbeddingFast  # noqa: E402
from sfd_core.reporting import log  # noqa: E402


def median_ms(fn, device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def stock_qkv_norm_rope(qkv, bias, q_norm, k_norm, rope, num_heads):
    """Attention.forward without fused kernels, up to the SDPA inputs, from the qkv projection before its bias (the
    fused op adds the bias and returns its gradient, like ``stock_swiglu``)."""
    batch, tokens, width = qkv.shape
    q, k, v = (qkv + bias).view(batch, tokens, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return rope(q_norm(q)), rope(k_norm(k)), v


def stock_swiglu(h, bias):
    """The MLP middle of the stock module, from w12's output before its bias (the fused op adds the bias and
    returns its gradient; the stock linear layer adds it in the matmul and sums its gradient separately)."""
    gate, value = (h + bias).chunk(2, dim=-1)
    return F.silu(gate) * value


# qkv_norm_rope launches tried (with the bias): forward (tokens per program, warps), backward (tokens per tile, warps,
# tiles per program)
QKV_FORWARD_SWEEP = tuple((tokens, warps) for tokens in (1, 2, 4) for warps in (1, 2, 4, 8))
QKV_BACKWARD_SWEEP = tuple((tokens, warps, tiles) for tokens in (1, 2) for warps in (2, 4) for tiles in (2, 4, 8, 16))
# (rows per program, warps) tried for each pass of the norm_modulate kernels
NORM_SWEEP = ((1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16))
# (tokens per tile, columns per program, warps) tried for the norm backward's token sums
TOKEN_SUMS_SWEEP = ((16, 64, 4), (32, 64, 4), (64, 64, 8), (32, 128, 4), (32, 128, 8), (16, 32, 2))


# Each op's launch configurations (module attributes, tuples of ints), in the order the sweep report, the
# train_step.py flags and its JSON flatten them into one list per op.
LAUNCH_CONFIGS = {"qkv": (qkv_module, ("FORWARD_CONFIG", "BACKWARD_CONFIG")),
                  "swiglu": (swiglu_module, ("FORWARD_CONFIG", "BACKWARD_CONFIG")),
                  "norm": (norm_module, ("FORWARD_CONFIG", "BACKWARD_CONFIG", "TOKEN_SUMS_CONFIG"))}


def launch_configs() -> dict[str, list[int]]:
    """The fused kernels' current launch configurations, flattened per op."""
    return {op: [v for name in names for v in getattr(module, name)] for op, (module, names) in LAUNCH_CONFIGS.items()}


def set_launch_configs(op: str, values: list[int]) -> None:
    """Sets ``op``'s launch configurations from a flattened list, in order; a list may stop after any whole
    configuration (the rest keep theirs)."""
    module, names = LAUNCH_CONFIGS[op]
    values = list(values)
    for name in names:
        if not values:
            return
        width = len(getattr(module, name))
        if len(values) < width:
            raise ValueError(f"{op} launch values end inside {name} ({width} values): {values}")
        setattr(module, name, tuple(values[:width]))
        values = values[width:]
    if values:
        raise ValueError(f"{op} takes {sum(len(getattr(module, n)) for n in names)} launch values; {values} left")


def best_launch(qkv_sweep: list[dict], swiglu_sweep: list[dict], norm_sweep: list[dict]) -> dict[str, list[int]]:
    """The fastest configuration of each pass, flattened as ``train_step.py --qkv-config / --swiglu-config /
    --norm-config`` take them (also read whole by its ``--launch-configs``)."""
    def fastest(rows, key="ms"):
        return list(min(rows, key=lambda r: r[key])["config"])

    def of_pass(rows, name):
        return [r for r in rows if r["pass"] == name]

    return {"qkv": fastest(of_pass(qkv_sweep, "forward")) + fastest(of_pass(qkv_sweep, "backward")),
            "swiglu": fastest(swiglu_sweep, "fwd_ms") + fastest(swiglu_sweep, "bwd_ms"),
            "norm": sum((fastest(of_pass(norm_sweep, name)) for name in ("forward", "backward", "token sums")), [])}


def stock_adaln_inputs(x, attn_out, gate, norm1, norm2, shift1, scale1, shift2, scale2):
    """A block's adaLN work up to the MLP input, unfused: h1, the stream after the attention residual, h2."""
    h1 = modulate(norm1(x), shift1, scale1)
    x = x + gate.unsqueeze(1) * attn_out
    return h1, x, modulate(norm2(x), shift2, scale2)


def fused_adaln_inputs(x, attn_out, gate, norm1, norm2, shift1, scale1, shift2, scale2):
    h1 = norm_modulate(x, norm1.weight, shift1, scale1, norm1.eps)
    return (h1, *residual_norm_modulate(x, attn_out, gate, norm2.weight, shift2, scale2, norm2.eps))


def fwd_and_fwd_bwd_ms(fn, inputs, grads_like, device, reps) -> tuple[float, float]:
    """Median forward time (no grad) and forward+backward time of ``fn``; ``grads_like`` maps its outputs to their
    upstream gradients, ``inputs`` are the leaves whose grads are cleared between repetitions."""
    def forward_backward():
        for t in inputs:
            t.grad = None
        outs = fn()
        torch.autograd.backward(outs, grads_like(outs))
    with torch.no_grad():
        fwd = median_ms(fn, device, reps)
    return fwd, median_ms(forward_backward, device, reps)


def timed_pair(name, stock_fn, fused_fn, inputs, grads_like, device, reps, fused_bytes) -> dict:
    """Forward and forward+backward times of both paths; ``grads_like`` maps outputs to their upstream grads."""
    row = {"op": name}
    for label, fn in (("stock", stock_fn), ("fused", fused_fn)):
        row[f"{label}_fwd_ms"], row[f"{label}_fwd_bwd_ms"] = fwd_and_fwd_bwd_ms(fn, inputs, grads_like, device, reps)
    row["speedup_fwd"] = row["stock_fwd_ms"] / row["fused_fwd_ms"]
    row["speedup_fwd_bwd"] = row["stock_fwd_bwd_ms"] / row["fused_fwd_bwd_ms"]
    row["fused_fwd_bwd_gb_per_s"] = fused_bytes / (row["fused_fwd_bwd_ms"] * 1e-3) / 1e9
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1152)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--mlp-hidden", type=int, default=3072)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time launch configurations of the fused kernels too")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    compile_stock = device.type == "cuda"
    b, n, h, heads = args.batch, args.tokens, args.hidden, args.heads
    head_dim, grid = h // heads, int(round(n ** 0.5))
    item = torch.finfo(dtype).bits // 8

    torch.manual_seed(0)
    qkv = torch.randn(b, n, 3 * h, device=device, dtype=dtype).requires_grad_()
    qkv_bias = (0.1 * torch.randn(3 * h, device=device, dtype=dtype)).requires_grad_()
    q_norm, k_norm = RMSNorm(head_dim).to(device), RMSNorm(head_dim).to(device)
    rope = VisionRotaryEmbeddingFast(head_dim, grid).to(device)
    stock_attn = torch.compile(stock_qkv_norm_rope) if compile_stock else stock_qkv_norm_rope

    def fused_attn():
        return qkv_norm_rope(qkv, q_norm.weight, k_norm.weight, rope.freqs_cos, rope.freqs_sin, heads, q_norm.eps,
                             qkv_bias)

    # SDPA hands back dq, dk, dv in the layout of its inputs: [B, N, H, D] memory seen as [B, H, N, D]
    def attn_grads(outs):
        return [torch.ones(b, n, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
                if o.shape[1] == heads else torch.ones_like(o) for o in outs]

    # forward: read qkv, write q, k, v; backward: read raw q and k, dq, dk, dv, write dqkv
    qkv_bytes = (2 + 2 / 3 + 2) * qkv.numel() * item
    rows = [timed_pair("qkv_norm_rope", lambda: stock_attn(qkv, qkv_bias, q_norm, k_norm, rope, heads), fused_attn,
                       [qkv, qkv_bias, q_norm.weight, k_norm.weight], attn_grads, device, args.reps, qkv_bytes)]

    mlp_in = torch.randn(b, n, 2 * args.mlp_hidden, device=device, dtype=dtype).requires_grad_()
    mlp_bias = (0.1 * torch.randn(2 * args.mlp_hidden, device=device, dtype=dtype)).requires_grad_()
    stock_mlp = torch.compile(stock_swiglu) if compile_stock else stock_swiglu
    swiglu_bytes = (1.5 + 2.5) * mlp_in.numel() * item   # fwd read h write h/2; bwd read h + h/2, write h
    rows.append(timed_pair("swiglu", lambda: stock_mlp(mlp_in, mlp_bias), lambda: swiglu(mlp_in, mlp_bias),
                           [mlp_in, mlp_bias], lambda out: torch.ones_like(out), device, args.reps, swiglu_bytes))

    stream, attn_out = (torch.randn(b, n, h, device=device, dtype=dtype).requires_grad_() for _ in range(2))
    norm1, norm2 = RMSNorm(h).to(device), RMSNorm(h).to(device)
    conditioning = [(0.1 * torch.randn(b, h, device=device, dtype=dtype)).requires_grad_() for _ in range(5)]
    adaln_args = (stream, attn_out, conditioning[0], norm1, norm2, *conditioning[1:])
    stock_adaln = torch.compile(stock_adaln_inputs) if compile_stock else stock_adaln_inputs
    # compiled too: the [B, C] gradient work after the fused ops' token sums is traced
    fused_adaln = torch.compile(fused_adaln_inputs) if compile_stock else fused_adaln_inputs
    # forward: read x, write h1; read x, attn_out, write stream, h2. backward rows: read dh1, x, write dx; read
    # dh2, d stream, stream, write dx, d attn_out; token sums: read dh1, x; dh2, stream, attn_out, dx
    adaln_bytes = 20 * stream.numel() * item
    rows.append(timed_pair("norm_modulate (block pair)", lambda: stock_adaln(*adaln_args),
                           lambda: fused_adaln(*adaln_args), [stream, attn_out, norm1.weight, norm2.weight,
                                                                     *conditioning],
                           lambda outs: [torch.ones_like(o) for o in outs], device, args.reps, adaln_bytes))

    sweep, swiglu_sweep, norm_sweep = [], [], []
    if args.sweep:
        defaults = launch_configs()
        outs = fused_attn()
        grads = [g.contiguous() for g in attn_grads(outs)]
        mlp_grad = torch.ones(b, n, args.mlp_hidden, device=device, dtype=dtype)
        try:
            for config in QKV_FORWARD_SWEEP:
                qkv_module.FORWARD_CONFIG = config
                with torch.no_grad():
                    fwd = median_ms(fused_attn, device, args.reps)
                sweep.append({"pass": "forward", "config": config, "ms": fwd})
                log(f"qkv_norm_rope forward (tokens, warps) {config}: {fwd:.3f} ms")
            for config in QKV_BACKWARD_SWEEP:
                qkv_module.BACKWARD_CONFIG = config
                bwd = median_ms(lambda: qkv_module.qkv_norm_rope_backward(
                    *grads, qkv, q_norm.weight, k_norm.weight, rope.freqs_cos, rope.freqs_sin, heads, q_norm.eps,
                    qkv_bias), device, args.reps)
                sweep.append({"pass": "backward", "config": config, "ms": bwd})
                log(f"qkv_norm_rope backward (tokens, warps, tiles per program) {config}: {bwd:.3f} ms")
            for config in ((16, 128, 4), (8, 256, 4), (4, 512, 4), (8, 512, 8), (32, 128, 8), (16, 256, 8)):
                swiglu_module.FORWARD_CONFIG = swiglu_module.BACKWARD_CONFIG = config
                with torch.no_grad():
                    fwd = median_ms(lambda: swiglu(mlp_in, mlp_bias), device, args.reps)
                bwd = median_ms(lambda: swiglu_module.swiglu_backward(mlp_grad, mlp_in, mlp_bias), device,
                                args.reps)
                swiglu_sweep.append({"config": config, "fwd_ms": fwd, "bwd_ms": bwd})
                log(f"swiglu (rows, cols, warps) {config}: fwd {fwd:.3f} ms, bwd {bwd:.3f} ms")
            grad = torch.ones_like(stream)
            for config in NORM_SWEEP:
                norm_module.FORWARD_CONFIG = config
                with torch.no_grad():
                    fwd = median_ms(lambda: residual_norm_modulate(stream, attn_out, conditioning[0], norm2.weight,
                                                                   *conditioning[3:], 1e-6), device, args.reps)
                norm_sweep.append({"pass": "forward", "config": config, "ms": fwd})
                log(f"residual_norm_modulate forward (rows, warps) {config}: {fwd:.3f} ms")
            for config in NORM_SWEEP:
                norm_module.BACKWARD_CONFIG = config
                bwd = median_ms(lambda: norm_module.norm_modulate_backward(
                    grad, grad, stream, attn_out, conditioning[0], norm2.weight, conditioning[4], dtype, 1e-6),
                    device, args.reps)
                norm_sweep.append({"pass": "backward", "config": config, "ms": bwd})
                log(f"residual_norm_modulate backward rows (rows, warps) {config}: {bwd:.3f} ms")
            rstd = torch.rand(b, n, device=device)
            for config in TOKEN_SUMS_SWEEP:
                norm_module.TOKEN_SUMS_CONFIG = config
                sums = median_ms(lambda: norm_module.norm_modulate_token_sums(
                    grad, stream, rstd, grad, attn_out, norm2.weight), device, args.reps)   # any [C] tensor as y bias
                norm_sweep.append({"pass": "token sums", "config": config, "ms": sums})
                log(f"norm_modulate token sums (tokens, cols, warps) {config}: {sums:.3f} ms")
        finally:
            for op, values in defaults.items():
                set_launch_configs(op, values)

    print(f"\n### fused kernels, batch {b} x {n} tokens, hidden {h}, {heads} heads, bf16 "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})\n")
    print("| op | stock fwd ms | fused fwd ms | speed-up | stock fwd+bwd ms | fused fwd+bwd ms | speed-up | fused GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['stock_fwd_ms']:.3f} | {r['fused_fwd_ms']:.3f} | {r['speedup_fwd']:.2f}x | "
              f"{r['stock_fwd_bwd_ms']:.3f} | {r['fused_fwd_bwd_ms']:.3f} | {r['speedup_fwd_bwd']:.2f}x | "
              f"{r['fused_fwd_bwd_gb_per_s']:.0f} |")
    report = {"device": str(device), "torch": torch.__version__, "batch": b, "tokens": n, "hidden": h,
              "heads": heads, "mlp_hidden": args.mlp_hidden, "stock_compiled": compile_stock, "results": rows,
              "qkv_norm_rope_sweep": sweep, "swiglu_sweep": swiglu_sweep,
              "norm_modulate_sweep": norm_sweep}
    if args.sweep:
        report["best_launch"] = best_launch(sweep, swiglu_sweep, norm_sweep)
        print("\nfastest launches: " + " ".join(f"--{op}-config {','.join(map(str, values))}"
                                                for op, values in report["best_launch"].items()))
    write_json_report(report, "kernels", args.json)
    return report


if __name__ == "__main__":
    main()
