"""SFD training-step and sampler-forward throughput on one device, with MFU against a measured matmul ceiling.

Training step = SFD loss forward (model in bf16 autocast, REPA on) + backward + AdamW + EMA update
(``sfd_core.optim.AdamWWithEMA``; ``--update eager``: torch's fused AdamW, then a multi-tensor EMA; ``fused``:
both in one Triton kernel, sfd_core.kernels.adamw_ema), on synthetic on-device batches (no data loading). Weights
(``--weights``): fp32 (official), or bf16 copies of the linear/convolution weights with fp32 masters in the
optimizer (the same forward and gradients as autocast gives fp32 weights, without its casts). Variants: eager,
``torch.compile`` default, ``mode="max-autotune-no-cudagraphs"`` and ``mode="reduce-overhead"`` (CUDA graphs:
no launch gaps, which matter at batch 32); the forward+loss function is compiled (the backward follows through
AOTAutograd). ``regional`` compiles one block and reuses it for all (seconds instead of minutes of compile).
``step-graph`` / ``regional-step-graph`` capture the whole compiled step, update included, in CUDA graphs.
Each runs with the residual stream in fp32 (official) and in bf16 (``low_precision_residual``), and with the
stock modules or the Triton kernels (``--kernels fused``).

FLOPs per image, forward, matmuls only (a multiply-add = 2 FLOPs), N tokens, H hidden, F SwiGLU hidden,
L blocks, C input channels, p patch, R / D REPA projector hidden / output widths:

    per block     2N(3H^2)  qkv  + 2N^2 H (Q K^T) + 2N^2 H (A V) + 2N H^2 proj + 2N(2HF) w12 + 2N(FH) w3
                  + 2H(6H) adaLN (one row per image)
    outside       2N(C p^2)H patch embed + 2N H(p^2 C) final linear + 2H(2H) final adaLN
                  + 2 * 2(256 H/2 + (H/2)^2) timestep MLPs (SFD; plain: 2(256 H + H^2))
    REPA (train)  2N(HR + R^2 + RD)

Training FLOPs per image = 3 x forward (backward = 2 x forward; flash-attention recomputation not counted, as
usual for MFU). ``torch.utils.flop_counter.FlopCounterMode`` cross-checks both numbers (SDPA forced to the math
kernel while counting so attention shows up as matmuls on every device). Paper Table 16's 116.5 "GFLOPs" for
XL/1 is multiply-adds, i.e. about half of our forward count.

MFU = achieved model FLOP/s / measured bf16 ceiling (median of timed 8192^3 bf16 matmuls, CUDA events).

    python benchmarks/train_step.py                                   # XL/1 on cuda, batch 32 and 128
    python benchmarks/train_step.py --model LightningDiT-tiny/1 --device cpu --steps 2   # smoke check

Prints a Markdown table; writes JSON to $OUT/train_step.json when OUT is set (or to --json).
"""
from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import platform
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import print_kernel_profile, write_json_report  # noqa: E402
from benchmarks.kernels import LAUNCH_CONFIGS, launch_configs, set_launch_configs  # noqa: E402
from sfd_core.models import build_model, model_config  # noqa: E402
from sfd_core.optim import AdamWWithEMA, autocast_weights  # noqa: E402
from sfd_core.reporting import log  # noqa: E402

try:  # the project's SFD objective; a faithful local copy keeps the benchmark usable without it
    from sfd_core.transport import LossConfig, sfd_training_loss
except ImportError:  # pragma: no cover
    LossConfig = None
    sfd_training_loss = None

COMPILE_MODES = {"eager": None, "compile": "default", "max-autotune": "max-autotune-no-cudagraphs",
                 "cudagraphs": "reduce-overhead", "regional": "default",
                 "regional-max-autotune": "max-autotune-no-cudagraphs"}
# Training only (CUDA): the whole step (forward + backward, then the update) captured in CUDA graphs and
# replayed, over the compiled variant named here: no launch gaps and no host work between the kernels.
STEP_GRAPHS = {"step-graph": "compile", "regional-step-graph": "regional"}
# Residual stream under autocast: "fp32" (promoted by the fp32 position embedding, the official behaviour) or
# "bf16" (LightningDiT(low_precision_residual=True): stays in the autocast dtype).
RESIDUAL_STREAMS = {"fp32": False, "bf16": True}
# "stock" modules, or "fused": LightningDiT(fused_kernels=True), the Triton kernels of sfd_core.kernels;
# "fused-no-norm-modulate" leaves the adaLN norm + modulation to Inductor (to attribute that kernel's share).
KERNELS = {"stock": False, "fused": True, "fused-no-norm-modulate": ("qkv_norm_rope", "swiglu")}
UPDATES = ("eager", "fused")   # AdamWWithEMA(fused=...)
# Weights the model computes with: "fp32" (autocast casts them every step) or "bf16" copies of the linear and
# convolution weights with fp32 masters in the optimizer (AdamWWithEMA(bf16_weights=autocast_weights(model))).
WEIGHTS = ("fp32", "bf16")
# Inductor settings a run compiles under (``--inductor``): "default", or named sets of torch._inductor.config
# values, so that a same-run A/B can show what a setting is worth.
INDUCTOR_SETS = {"default": {}, "cdt": {"coordinate_descent_tuning": True}}
EMA_DECAY = 0.9999


# ------------------------------------------------------------------------------------------------- FLOPs
def forward_flops_per_image(cfg: dict, with_repa: bool) -> int:
    """Analytic forward matmul FLOPs for one image (formula in the module docstring)."""
    h, depth, p, c = cfg["hidden_size"], cfg["depth"], cfg["patch_size"], cfg["in_channels"]
    n = (cfg["input_size"] // p) ** 2
    f = int(2 / 3 * int(h * cfg["mlp_ratio"]))
    c_out = 2 * c if cfg.get("learn_sigma") else c
    block = 2 * n * 3 * h * h + 4 * n * n * h + 2 * n * h * h + 2 * n * h * 2 * f + 2 * n * f * h + 2 * h * 6 * h
    outside = 2 * n * c * p * p * h + 2 * n * h * p * p * c_out + 2 * h * 2 * h
    if cfg["semantic_channels"] > 0:
        outside += 2 * 2 * (256 * (h // 2) + (h // 2) ** 2)
    else:
        outside += 2 * (256 * h + h * h)
    repa = 0
    if with_repa and cfg["use_repa"]:
        r, d = cfg["repa_projector_dim"], cfg["repa_out_dim"]
        repa = 2 * n * (h * r + r * r + r * d)
    return depth * block + outside + repa


def counted_flops_per_image(model, make_batch, device) -> tuple[float, float]:
    """FlopCounterMode (forward, forward+backward) per image of the training forward, batch 2."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x, t, y, _ = make_batch(2)
    model.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        velocity, projection = model(x, t, y)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as total:
        velocity, projection = model(x, t, y)
        (velocity.float().square().mean() + projection.float().square().mean()).backward()
    model.zero_grad(set_to_none=True)
    return fwd.get_total_flops() / 2, total.get_total_flops() / 2


# ------------------------------------------------------------------------------------------------ timing
class Timer:
    """Wall time of a region: CUDA events on GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def matmul_ceiling(device: torch.device, size: int, reps: int) -> float:
    """Median bf16 FLOP/s of size^3 matmuls."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        with Timer(device) as timer:
            a @ b
        times.append(timer.seconds)
    return 2 * size ** 3 / statistics.median(times)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------ training step
def local_sfd_loss(model, x1, y, dino, delta_t=0.3, semantic_channels=16, semantic_weight=2.0, repa_weight=1.0):
    """SFD objective (SPEC 5.1-5.2), used only when ``sfd_core.transport`` is unavailable."""
    import torch.nn.functional as F

    tau = torch.sigmoid(torch.randn(x1.shape[0], device=x1.device)) * (1 + delta_t)
    t_sem, t_tex = tau.clamp(max=1.0), (tau - delta_t).clamp(min=0.0)
    n_tex = x1.shape[1] - semantic_channels
    t = torch.cat([t_tex[:, None].expand(-1, n_tex), t_sem[:, None].expand(-1, semantic_channels)], 1)[..., None, None]
    x0 = torch.randn_like(x1)
    velocity, projection = model(t * x1 + (1 - t) * x0, (t_tex, t_sem), y)
    velocity, target = velocity.float(), x1 - x0
    weights = torch.ones(x1.shape[1], device=x1.device)
    weights[n_tex:] = semantic_weight
    mse = ((velocity - target) ** 2 * weights[:, None, None]).mean()
    cos = (1 - F.cosine_similarity(velocity, target, dim=1)).mean()
    repa = (1 - F.cosine_similarity(dino.flatten(2).transpose(1, 2), projection.float(), dim=-1)).mean()
    return {"loss": mse + cos + repa_weight * repa}


def make_loss_fn(model, semantic_channels: int):
    if sfd_training_loss is not None:
        cfg = LossConfig(semantic_channels=semantic_channels)
        return lambda x1, y, dino: sfd_training_loss(model, x1, y, dino, cfg)["loss"]
    return lambda x1, y, dino: local_sfd_loss(model, x1, y, dino, semantic_channels=semantic_channels)["loss"]


def capture_step(forward_backward, update: AdamWWithEMA, warmup: int):
    """The training step as two CUDA graphs (forward + backward; the update), after ``warmup`` eager steps on
    a side stream (compilation, allocator warm-up). The update's graph is captured after one real update
    from the first graph's gradients, which caches the kernel's pointer table of those (static) gradients.
    Returns the replaying step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            forward_backward()
            update.step()
            update.zero_grad()
    torch.cuda.current_stream().wait_stream(side)
    backward_graph, update_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(backward_graph):
        loss = forward_backward()
    backward_graph.replay()
    update.step()
    with torch.cuda.graph(update_graph):
        update.step()

    def step():
        backward_graph.replay()
        update_graph.replay()
        return loss
    return step


def bench_train(args, cfg: dict, device: torch.device, variant: str, residual: str, kernels: str, update_mode: str,
                weights: str, inductor: str, batch: int, flops_per_image: float, ceiling: float) -> dict:
    from torch._inductor import config as inductor_config

    with inductor_config.patch(INDUCTOR_SETS[inductor]):
        result = _bench_train(args, cfg, device, variant, residual, kernels, update_mode, weights, batch,
                              flops_per_image, ceiling)
    return {**result, "inductor": inductor}


def _bench_train(args, cfg: dict, device: torch.device, variant: str, residual: str, kernels: str,
                 update_mode: str, weights: str, batch: int, flops_per_image: float, ceiling: float) -> dict:
    reset_memory(device)
    torch._dynamo.reset()
    torch.manual_seed(0)
    overrides = {**args.overrides, "low_precision_residual": RESIDUAL_STREAMS[residual],
                 "fused_kernels": KERNELS[kernels]}
    model = build_model(args.model, **overrides).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = [e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    update = AdamWWithEMA(params, ema_params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, ema_decay=EMA_DECAY,
                          fused=update_mode == "fused",
                          bf16_weights=autocast_weights(model) if weights == "bf16" else ())
    loss_fn = make_loss_fn(model, cfg["semantic_channels"])
    compiled = STEP_GRAPHS.get(variant, variant)
    if compiled.startswith("regional"):   # one compile of a block, reused by all of them
        for block in model.blocks:
            block.compile(mode=COMPILE_MODES[compiled], dynamic=False)
    elif COMPILE_MODES[compiled]:
        loss_fn = torch.compile(loss_fn, mode=COMPILE_MODES[compiled], dynamic=False)
    x1 = torch.randn(batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"], device=device)
    y = torch.randint(0, cfg["num_classes"], (batch,), device=device)
    dino = torch.randn(batch, cfg["repa_out_dim"], cfg["input_size"] // cfg["patch_size"],
                       cfg["input_size"] // cfg["patch_size"], device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def forward_backward():
        if variant == "cudagraphs":   # a new iteration: earlier graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = loss_fn(x1, y, dino)
        loss.backward()
        return loss

    def step():
        loss = forward_backward()
        update.step()
        update.zero_grad()
        return loss

    t0 = time.perf_counter()
    if variant in STEP_GRAPHS:
        step = capture_step(forward_backward, update, args.warmup)
    for _ in range(args.warmup if variant not in STEP_GRAPHS else 0):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0
    with Timer(device) as timer:
        for _ in range(args.steps):
            loss = step()
    step_s = timer.seconds / args.steps
    if args.profile:
        print_kernel_profile(step, device, f"train {variant}, {residual} residual, {kernels} kernels, "
                             f"{update_mode} update, {weights} weights, batch {batch}", top=args.profile_top)
    img_per_s = batch / step_s
    result = {"kind": "train", "variant": variant, "residual": residual, "kernels": kernels, "update": update_mode,
              "weights": weights, "batch": batch, "step_ms": 1e3 * step_s, "img_per_s": img_per_s,
              "tflops": 3 * flops_per_image * img_per_s / 1e12, "mfu": 3 * flops_per_image * img_per_s / ceiling,
              "peak_mem_gib": peak_memory_gib(device), "warmup_s": warmup_s, "loss": float(loss.detach())}
    del model, ema, update, params, ema_params, loss_fn
    return result


# ------------------------------------------------------------------------------------------ sampler forward
def bench_sampler(args, cfg: dict, device: torch.device, variant: str, precision: str, flops_per_image: float,
                  ceiling: float) -> dict:
    reset_memory(device)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(args.model, **args.overrides).to(device).eval()
    forward = torch.compile(model, mode=COMPILE_MODES[variant], dynamic=False) if COMPILE_MODES[variant] else model
    batch = args.sampler_batch
    x = torch.randn(batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"], device=device)
    t = (torch.rand(batch, device=device), torch.rand(batch, device=device))
    y = torch.randint(0, cfg["num_classes"], (batch,), device=device)
    # fp32 = what the official sampler runs (TF32 matmuls allowed on GPU); bf16 = autocast.
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "fp32"
    try:
        with torch.no_grad(), ctx:
            for _ in range(args.warmup):
                forward(x, t, y)
            with Timer(device) as timer:
                for _ in range(args.steps):
                    forward(x, t, y)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    img_per_s = batch * args.steps / timer.seconds
    result = {"kind": "sampler", "variant": variant, "precision": precision, "batch": batch,
              "step_ms": 1e3 * timer.seconds / args.steps, "img_per_s": img_per_s,
              "tflops": flops_per_image * img_per_s / 1e12, "mfu": flops_per_image * img_per_s / ceiling,
              "peak_mem_gib": peak_memory_gib(device)}
    del model, forward
    return result


# ------------------------------------------------------------------------------------------------- driver
def markdown(results: list[dict]) -> str:
    lines = ["| run | variant | precision | residual | kernels | update | weights | inductor | batch | ms/step | img/s "
             "| TFLOP/s | MFU | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = (f"| {r['kind']} | {r['variant']} | {r.get('precision', 'bf16 autocast')} | {r.get('residual', '-')} "
                f"| {r.get('kernels', '-')} | {r.get('update', '-')} | {r.get('weights', '-')} "
                f"| {r.get('inductor', '-')} |")
        if "error" in r:
            lines.append(f"{head} {r['batch']} | error: {r['error'][:60]} | | | | |")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(f"{head} {r['batch']} | "
                     f"{r['step_ms']:.1f} | {r['img_per_s']:.1f} | {r['tflops']:.3g} | {r['mfu']:.3f} | {mem} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="LightningDiT-XL/1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="32,128", help="per-GPU training batches, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 cuda, 1 cpu)")
    parser.add_argument("--variants", default=None,
                        help=f"comma list of {sorted(COMPILE_MODES)} (default: eager,compile,max-autotune on "
                             "cuda, eager on cpu)")
    parser.add_argument("--residual", default="fp32,bf16",
                        help=f"training residual streams, comma list of {sorted(RESIDUAL_STREAMS)}")
    parser.add_argument("--kernels", default="stock", help=f"training kernels, comma list of {sorted(KERNELS)}")
    parser.add_argument("--update", default="fused", help=f"AdamW + EMA update, comma list of {list(UPDATES)}")
    parser.add_argument("--weights", default="fp32", help=f"model weights in training, comma list of {list(WEIGHTS)}")
    parser.add_argument("--qkv-config", default=None, metavar="FWD_TOKENS,FWD_WARPS,BWD_TOKENS,BWD_WARPS,BWD_TILES",
                        help="launch configuration of the fused qkv_norm_rope kernels (see benchmarks/kernels.py)")
    parser.add_argument("--swiglu-config", default=None, metavar="ROWS,COLS,WARPS,ROWS,COLS,WARPS",
                        help="launch configuration of the fused swiglu kernels (forward, then backward)")
    parser.add_argument("--norm-config", default=None,
                        metavar="FWD_ROWS,FWD_WARPS,BWD_ROWS,BWD_WARPS[,SUMS_TOKENS,SUMS_COLS,SUMS_WARPS]",
                        help="launch configuration of the fused norm_modulate kernels (and of the token sums)")
    parser.add_argument("--launch-configs", default=None, metavar="KERNELS_JSON",
                        help="the fastest launches of a benchmarks/kernels.py --sweep report (flags above win)")
    parser.add_argument("--sampler-variants", default=None, help="default: eager,compile on cuda, eager on cpu")
    parser.add_argument("--sampler-batch", type=int, default=256)
    parser.add_argument("--ceiling-size", type=int, default=None, help="matmul size (default 8192 cuda, 1024 cpu)")
    parser.add_argument("--ceiling-reps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="ARG=VALUE",
                        help="model constructor override, e.g. --set input_size=8 (repeatable)")
    parser.add_argument("--profile", action="store_true", help="print the top device kernels of each train run")
    parser.add_argument("--profile-top", type=int, default=45, help="kernels listed by --profile")
    parser.add_argument("--inductor", default="default",
                        help=f"Inductor settings of the compiled train runs, comma list of {sorted(INDUCTOR_SETS)}")
    parser.add_argument("--json", default=None, help="output JSON path (default $OUT/train_step.json)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    default_train, default_sampler = ("eager,compile,max-autotune", "eager,compile") if cuda else ("eager", "eager")

    def choices(value: str, allowed: dict, what: str) -> list[str]:
        picked = [v for v in value.split(",") if v and v != "none"]   # "none" skips that part of the benchmark
        for v in picked:
            if v not in allowed:
                parser.error(f"unknown {what} {v!r}; choose from {sorted(allowed)}")
        return picked

    args.variants = choices(args.variants or default_train, {**COMPILE_MODES, **STEP_GRAPHS}, "variant")
    if not cuda and set(args.variants) & set(STEP_GRAPHS):
        parser.error(f"{sorted(STEP_GRAPHS)} capture CUDA graphs: they need a cuda device")
    args.sampler_variants = choices(args.sampler_variants or default_sampler, COMPILE_MODES, "variant")
    args.residual = choices(args.residual, RESIDUAL_STREAMS, "residual stream")
    args.kernels = choices(args.kernels, KERNELS, "kernels")
    args.update = choices(args.update, dict.fromkeys(UPDATES), "update")
    args.weights = choices(args.weights, dict.fromkeys(WEIGHTS), "weights")
    args.inductor = choices(args.inductor, INDUCTOR_SETS, "Inductor settings")
    args.ceiling_size = args.ceiling_size or (8192 if cuda else 1024)
    args.overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    return args


def set_kernel_launch_configs(args) -> None:
    """``--qkv-config`` / ``--swiglu-config`` / ``--norm-config`` (or ``--launch-configs``): this run's launch
    configurations of the fused kernels."""
    best = json.loads(Path(args.launch_configs).read_text())["best_launch"] if args.launch_configs else {}
    for op in LAUNCH_CONFIGS:
        flag = getattr(args, f"{op}_config")
        values = [int(v) for v in flag.split(",")] if flag else best.get(op)
        if values:
            set_launch_configs(op, values)
    if best:
        print(f"launch configs: {launch_configs()}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_kernel_launch_configs(args)
    device = torch.device(args.device)
    cfg = model_config(args.model, **args.overrides)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = True
    train_fwd = forward_flops_per_image(cfg, with_repa=True)
    sample_fwd = forward_flops_per_image(cfg, with_repa=False)

    def make_batch(batch):
        size = cfg["input_size"]
        return (torch.randn(batch, cfg["in_channels"], size, size, device=device),
                (torch.rand(batch, device=device), torch.rand(batch, device=device)),
                torch.randint(0, cfg["num_classes"], (batch,), device=device), None)

    torch.manual_seed(0)
    counter_model = build_model(args.model, **args.overrides).to(device)
    counted_fwd, counted_total = counted_flops_per_image(counter_model, make_batch, device)
    del counter_model
    flops = {"analytic_forward_gflops": train_fwd / 1e9, "analytic_train_gflops": 3 * train_fwd / 1e9,
             "analytic_sampler_forward_gflops": sample_fwd / 1e9,
             "counted_forward_gflops": counted_fwd / 1e9, "counted_train_gflops": counted_total / 1e9,
             "forward_ratio_counted_over_analytic": counted_fwd / train_fwd,
             "train_ratio_counted_over_analytic": counted_total / (3 * train_fwd)}
    log(f"FLOPs/image: analytic fwd {train_fwd / 1e9:.2f} G (x3 = {3 * train_fwd / 1e9:.2f} G), "
        f"FlopCounterMode fwd {counted_fwd / 1e9:.2f} G, fwd+bwd {counted_total / 1e9:.2f} G")

    ceiling = matmul_ceiling(device, args.ceiling_size, args.ceiling_reps)
    log(f"bf16 matmul ceiling ({args.ceiling_size}^3, median of {args.ceiling_reps}): {ceiling / 1e12:.1f} TFLOP/s")

    results = []
    batches = [int(b) for b in args.batch_sizes.split(",")]
    for variant, residual, kernels, update_mode, weights, inductor, batch in itertools.product(
            args.variants, args.residual, args.kernels, args.update, args.weights, args.inductor, batches):
        log(f"train step: {variant}, {residual} residual, {kernels} kernels, {update_mode} update, "
            f"{weights} weights, {inductor} Inductor settings, batch {batch}")
        try:
            results.append(bench_train(args, cfg, device, variant, residual, kernels, update_mode, weights,
                                       inductor, batch, train_fwd, ceiling))
        except (torch.OutOfMemoryError, RuntimeError) as exc:   # report and go on with the other configurations
            traceback.print_exc()
            results.append({"kind": "train", "variant": variant, "residual": residual, "kernels": kernels,
                            "update": update_mode, "weights": weights, "inductor": inductor, "batch": batch,
                            "error": f"{type(exc).__name__}: {exc}"[:300]})
        log(json.dumps(results[-1]))
    for variant in args.sampler_variants:
        for precision in ("bf16", "fp32"):
            log(f"sampler forward: {variant}, {precision}, batch {args.sampler_batch}")
            try:
                results.append(bench_sampler(args, cfg, device, variant, precision, sample_fwd, ceiling))
            except torch.OutOfMemoryError as exc:
                results.append({"kind": "sampler", "variant": variant, "precision": precision,
                                "batch": args.sampler_batch, "error": f"OOM: {exc}"[:300]})
            log(json.dumps(results[-1]))

    report = {"model": args.model, "model_config": cfg, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "loss": "sfd_core.transport" if sfd_training_loss else "local",
              "matmul_ceiling_tflops": ceiling / 1e12, "ceiling_size": args.ceiling_size, "flops": flops,
              "steps": args.steps, "warmup": args.warmup, "launch_configs": launch_configs(),
              "results": results}
    print(f"\n### {args.model} on {report['device_name'] or device}: bf16 ceiling {ceiling / 1e12:.1f} TFLOP/s, "
          f"train {3 * train_fwd / 1e9:.1f} GFLOP/img (counted {counted_total / 1e9:.1f}), "
          f"sampler fwd {sample_fwd / 1e9:.1f} GFLOP/img\n")
    print(markdown(results))
    write_json_report(report, "train_step", args.json)
    return report


if __name__ == "__main__":
    main()
