"""Sample-generation throughput on one device: our fast path against the official-style path, in one run.

Both paths run ``sfd_core.generate.Generator.images`` exactly as the sfd_samples stage does (per-index noise,
three-phase semantic-first sampler with AutoGuidance scale 1.5, texture de-normalisation, f16d32 VAE decode to
uint8, copy to host):

- fast: Euler with 100 grid points (99 updates), DiT under bf16 autocast, ``torch.compile``, batch 256;
- official: dopri5 (atol 1e-6, rtol 1e-3), fp32 with TF32 matmuls (as the official sampler sets), eager,
  4 images per process (the official AutoGuidance setting).

Networks at real size with random weights: LightningDiT-XL/1 (main) and LightningDiT-B/1 (AutoGuidance), with the
layers the official init zeroes (adaLN, final layer) re-drawn N(0, 0.02) so the velocity field is not zero and
dopri5 has real work; the LDM f16d32 texture VAE decoder at 256 px. Caveat: dopri5's step count depends on the
velocity field, so a trained model's NFE differs from the one measured here; the table gives NFE and seconds per
NFE so the official-path estimate can be redone for another NFE. PNG encoding and shard writes are not timed
(the stage overlaps them with sampling in a background thread).

50K extrapolation: seconds = 50000 / (img/s) on one GPU; ranks own disjoint shards, so N GPUs divide it by N.

    python benchmarks/generation.py                 # on a GPU
    python benchmarks/generation.py --smoke         # CPU, tiny networks, few steps: checks the script runs

Prints a Markdown table; writes JSON to $OUT/generation.json when OUT is set (or to --json).
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_json_report  # noqa: E402
from sfd_core import generate  # noqa: E402
from sfd_core.encoders.texture_vae import LDM_F16D32_ARCH, TextureVAE, ldm_autoencoder_config  # noqa: E402
from sfd_core.models import build_model  # noqa: E402
from sfd_core.standins import TINY_LDM_ARCH  # noqa: E402

TARGET_SPEEDUP = 3.0
TOTAL_SAMPLES = 50_000
GUIDANCE_SCALE = 1.5


# ---------------------------------------------------------------------------------------------- networks

def random_network(name: str, seed: int, **overrides) -> torch.nn.Module:
    """A named LightningDiT with random weights everywhere, including the layers the official init zeroes."""
    torch.manual_seed(seed)
    model = build_model(name, **overrides)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ("adaLN_modulation" in module_name
                                                        or module_name == "final_layer.linear"):
                module.weight.normal_(0.0, 0.02)
    return model


def random_texture_vae(resolution: int, latent_channels: int, tiny: bool) -> TextureVAE:
    from diffusers import AutoencoderKL

    arch = {**(TINY_LDM_ARCH if tiny else LDM_F16D32_ARCH), "sample_size": resolution,
            "latent_channels": latent_channels}
    torch.manual_seed(2)
    return TextureVAE(AutoencoderKL(**ldm_autoencoder_config(arch)), "ldm_f16d32")


# ------------------------------------------------------------------------------------------------ timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_path(label: str, cfg: generate.Config, networks: dict[str, Any], device: torch.device,
               batches: int, warmup: int) -> dict[str, Any]:
    """img/s of ``Generator.images`` over ``batches`` full batches after ``warmup`` (compilation) batches."""
    main = generate.prepare_network(networks["main"], device, cfg.compile_mode)
    weak = generate.prepare_network(networks["weak"], device, cfg.compile_mode)
    base = networks["main"]
    texture_channels = base.in_channels - base.semantic_channels
    source = generate.ModelSource(name="random", overrides={}, weights="", delta_t=0.3, latent_multiplier=1.0,
                                  texture_mean=[0.0] * texture_channels, texture_std=[1.0] * texture_channels)
    generator = generate.Generator(cfg, main, weak, networks["vae"], source, device, base.semantic_channels,
                                   (base.in_channels, base.input_size, base.input_size))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_index = 0

    def next_batch() -> int:
        nonlocal start_index
        _, _, nfe = generator.images(range(start_index, start_index + cfg.batch_size))
        start_index += cfg.batch_size
        return nfe

    started = time.perf_counter()
    for _ in range(warmup):
        next_batch()
    synchronize(device)
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    nfes = [next_batch() for _ in range(batches)]
    synchronize(device)
    seconds = time.perf_counter() - started
    images = batches * cfg.batch_size
    img_per_s = images / seconds
    nfe = sum(nfes) / len(nfes)
    return {
        "path": label, "method": cfg.method, "num_steps": cfg.num_steps if cfg.method != "dopri5" else None,
        "precision": cfg.precision, "compile_mode": cfg.compile_mode or "eager", "batch_size": cfg.batch_size,
        "timed_images": images, "img_per_s": img_per_s, "nfe_per_batch": nfe,
        # Each drift evaluation runs both networks (AutoGuidance).
        "seconds_per_nfe_per_batch": seconds / batches / nfe, "warmup_seconds": warmup_s,
        "hours_50k_1gpu": TOTAL_SAMPLES / img_per_s / 3600, "hours_50k_8gpu": TOTAL_SAMPLES / img_per_s / 3600 / 8,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


# ----------------------------------------------------------------------------------------------- report

def markdown(results: list[dict[str, Any]], speedup: float) -> str:
    lines = ["| path | method | precision | compile | batch | NFE/batch | img/s | 50K on 1 GPU (h) | 50K on 8 GPUs (h) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        method = r["method"] + (f"-{r['num_steps']}" if r["num_steps"] else "")
        lines.append(f"| {r['path']} | {method} | {r['precision']} | {r['compile_mode']} | {r['batch_size']} | "
                     f"{r['nfe_per_batch']:.0f} | {r['img_per_s']:.3f} | {r['hours_50k_1gpu']:.2f} | "
                     f"{r['hours_50k_8gpu']:.2f} |")
    verdict = "meets" if speedup >= TARGET_SPEEDUP else "misses"
    lines += ["", f"Speed-up fast / official: {speedup:.1f}x ({verdict} the {TARGET_SPEEDUP:.0f}x target). "
                  "50K times are extrapolated from the measured img/s."]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny networks, few steps")
    parser.add_argument("--device", default=None)
    parser.add_argument("--fast-batch", type=int, default=256)
    parser.add_argument("--fast-steps", type=int, default=100)
    parser.add_argument("--fast-compile", default="default", help='torch.compile mode ("" for eager)')
    parser.add_argument("--fast-batches", type=int, default=3)
    parser.add_argument("--official-batch", type=int, default=4)
    parser.add_argument("--official-batches", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.fast_batch, args.fast_steps, args.fast_compile, args.fast_batches = 4, 6, "", 1
        args.official_batch, args.official_batches = 2, 1
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        overrides = {"input_size": 4}
        networks = {"main": random_network("LightningDiT-tiny/1", 0, **overrides),
                    "weak": random_network("LightningDiT-tiny/1", 1, **overrides),
                    "vae": random_texture_vae(64, 32, tiny=True)}
    else:
        networks = {"main": random_network("LightningDiT-XL/1", 0), "weak": random_network("LightningDiT-B/1", 1),
                    "vae": random_texture_vae(256, 32, tiny=False)}
    networks["vae"].to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the official sampler's setting; bf16 autocast ignores it
        torch.backends.cudnn.allow_tf32 = True
    common = dict(out_url="unused", cfg_scale=GUIDANCE_SCALE, num_classes=1000, per_class=50, seed=0)
    fast = generate.Config(**common, method="euler", num_steps=args.fast_steps, precision="bf16",
                           batch_size=args.fast_batch, compile_mode=args.fast_compile)
    official = generate.Config(**common, method="dopri5", precision="fp32", batch_size=args.official_batch)
    results = [bench_path("fast", fast, networks, device, args.fast_batches, warmup=1),
               bench_path("official-style", official, networks, device, args.official_batches, warmup=0)]
    speedup = results[0]["img_per_s"] / results[1]["img_per_s"]
    report = {
        "benchmark": "generation", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(), "torch": torch.__version__, "smoke": args.smoke,
        "guidance": f"AutoGuidance scale {GUIDANCE_SCALE}", "results": results, "speedup": speedup,
        "target_speedup": TARGET_SPEEDUP, "configs": {"fast": dataclasses.asdict(fast),
                                                      "official": dataclasses.asdict(official)},
    }
    print(markdown(results, speedup))
    write_json_report(report, "generation", args.json)
    return report


if __name__ == "__main__":
    main()
