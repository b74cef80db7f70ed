"""Feature-extraction throughput on one device: our optimised path against an official-style fp32 loop.

Networks at real size with random weights: the SFD texture VAE (LDM f16d32 encoder, SPEC §2.1) and DINOv2
ViT-B/14-reg4 at 224 (LayerScale set to 1 so the blocks are not near-identities). Every image is encoded with
its h-flip, as in the stages.

- optimised: ``sfd_core.extract_features.TextureEncoder`` / ``DinoEncoder`` exactly as the stages run them:
  bf16 weights, channels_last, ``torch.compile``, image + flip in one forward of 2 x batch, per-sample noise
  handed in from pinned host memory.
- naive: like the official extractor (LightningDiT/SFD ``extract_features.py``): fp32 weights with TF32 on,
  batch 20, image and flip as two separate forwards, ``latent_dist.sample()`` on the device, no compile.

Throughput counts source images per second (each also flipped); inputs are uint8 crops already on the device,
so data loading is not measured. FLOPs per image (image + flip) are counted with
``torch.utils.flop_counter.FlopCounterMode``; achieved TFLOP/s = FLOPs/image x images/s. Accuracy: max abs and
relative differences of the optimised outputs against the same encoder in strict fp32 (TF32 off) on the same
32 images and noise (relative = max |diff| / max |reference|).

    python benchmarks/extraction.py                 # on a GPU
    python benchmarks/extraction.py --smoke         # CPU, tiny networks, no compile: checks the script runs

Prints a Markdown table; writes JSON to $OUT/extraction.json when OUT is set (or to --json).
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import print_kernel_profile, write_json_report  # noqa: E402
from sfd_core.builtin_data import iter_builtin  # noqa: E402
from sfd_core.encoders import DINOv2Encoder, TextureVAE  # noqa: E402
from sfd_core.encoders.dinov2 import DINOV2_MODEL_NAME  # noqa: E402
from sfd_core.encoders.texture_vae import LDM_F16D32_ARCH, ldm_autoencoder_config  # noqa: E402
from sfd_core.extract_features import DinoEncoder, TextureEncoder, set_precision  # noqa: E402
from sfd_core.imaging import center_crop_arr  # noqa: E402
from sfd_core.standins import TINY_DINOV2_ARCH, TINY_LDM_ARCH  # noqa: E402

NAIVE_BATCH = 20  # the official extractor's default
ACCURACY_IMAGES = 32  # images compared against strict fp32 (keeps the fp32 pass small in memory)


# ---------------------------------------------------------------------------------------------- networks

def build_texture_vae(resolution: int, tiny: bool) -> TextureVAE:
    from diffusers import AutoencoderKL

    arch = {**(TINY_LDM_ARCH if tiny else LDM_F16D32_ARCH), "sample_size": resolution}
    torch.manual_seed(0)
    return TextureVAE(AutoencoderKL(**ldm_autoencoder_config(arch)), "ldm_f16d32")


def build_dinov2(tiny: bool) -> DINOv2Encoder:
    import timm

    torch.manual_seed(1)
    vit = timm.create_model(DINOV2_MODEL_NAME, pretrained=False, num_classes=0, img_size=56 if tiny else 224,
                            **(TINY_DINOV2_ARCH if tiny else {}))
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(1.0)
    return DINOv2Encoder(vit)


def photo_batch(batch: int, resolution: int) -> torch.Tensor:
    """uint8 [batch, 3, R, R]: ADM crops of the builtin photos (real image statistics), repeated to fill."""
    crops = [np.array(center_crop_arr(s.image, resolution)) for s in iter_builtin(2, seed=0)]
    stacked = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
    return stacked.repeat((batch + len(crops) - 1) // len(crops), 1, 1, 1)[:batch].contiguous()


# ------------------------------------------------------------------------------------------------ timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step: Callable[[], Any], images_per_step: int, steps: int, warmup: int,
                      device: torch.device) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return images_per_step * steps / (time.perf_counter() - start)


def counted_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def max_differences(fast: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = (fast.double() - reference.double()).abs()
    scale = reference.double().abs().max().clamp_min(1e-30)
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale), "mean_abs": float(diff.mean())}


# ------------------------------------------------------------------------------------------------ encoders

def bench_texture(args, device: torch.device, images: torch.Tensor) -> dict[str, Any]:
    base = build_texture_vae(args.resolution, args.smoke)
    fast = TextureEncoder(copy.deepcopy(base), device, "bf16", args.compile, True, args.batch)
    strict = TextureEncoder(copy.deepcopy(base), device, "fp32", False, False, args.batch)
    shape = fast.output_shape(args.resolution)
    noise = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(0))
    noise_flip = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(1))
    if device.type == "cuda":
        noise, noise_flip = noise.pin_memory(), noise_flip.pin_memory()
    on_device = images[: args.batch].to(device)

    set_precision("bf16")
    optimised = images_per_second(lambda: fast(on_device, noise, noise_flip), args.batch, args.steps, args.warmup,
                                  device)
    if args.profile:
        print_kernel_profile(lambda: fast(on_device, noise, noise_flip), device, "texture VAE, optimised", top=30)
    k = min(ACCURACY_IMAGES, args.batch)
    with torch.no_grad():
        got = fast(on_device[:k], noise[:k], noise_flip[:k])
        set_precision("fp32")
        want = strict(on_device[:k], noise[:k], noise_flip[:k])
    accuracy = {name: max_differences(got[name], want[name]) for name in want}

    naive_vae = copy.deepcopy(base).autoencoder.to(device)
    naive_images = images[:NAIVE_BATCH].to(device)

    @torch.no_grad()
    def naive_step():
        x = (naive_images.float() / 255.0 - 0.5) / 0.5
        for view in (x, x.flip(-1)):
            naive_vae.encode(view).latent_dist.sample()

    set_precision("tf32")
    naive = images_per_second(naive_step, len(naive_images), args.naive_steps, args.warmup, device)
    one = on_device[:1]
    flops = counted_flops(lambda: strict(one, noise[:1], noise_flip[:1]))  # image + flip
    return _result("texture_vae_f16d32", optimised, naive, flops, accuracy, list(shape))


def bench_dino(args, device: torch.device, images: torch.Tensor) -> dict[str, Any]:
    base = build_dinov2(args.smoke)
    fast = DinoEncoder(copy.deepcopy(base), device, "bf16", args.compile, True, args.dino_batch)
    strict = DinoEncoder(copy.deepcopy(base), device, "fp32", False, False, args.dino_batch)
    on_device = images[: args.dino_batch].to(device)

    set_precision("bf16")
    optimised = images_per_second(lambda: fast(on_device), len(on_device), args.steps, args.warmup, device)
    if args.profile:
        print_kernel_profile(lambda: fast(on_device), device, "DINOv2, optimised", top=30)
    k = min(ACCURACY_IMAGES, args.dino_batch)
    with torch.no_grad():
        got = fast(on_device[:k])
        set_precision("fp32")
        want = strict(on_device[:k])
    accuracy = {name: max_differences(got[name].half(), want[name]) for name in want}  # stored as float16

    naive_dino = copy.deepcopy(base).to(device)
    naive_images = images[:NAIVE_BATCH].to(device)

    @torch.no_grad()
    def naive_step():
        x = (naive_images.float() / 255.0 - 0.5) / 0.5
        for view in (x, x.flip(-1)):
            naive_dino.features_from_adm(view)

    set_precision("tf32")
    naive = images_per_second(naive_step, len(naive_images), args.naive_steps, args.warmup, device)
    flops = counted_flops(lambda: strict(on_device[:1]))
    return _result("dinov2_vitb14_reg4", optimised, naive, flops, accuracy, [base.embed_dim, base.grid, base.grid])


def _result(name: str, optimised: float, naive: float, flops: int, accuracy: dict, shape: list[int]) -> dict:
    return {"encoder": name, "output_shape": shape, "optimised_img_per_s": optimised, "naive_img_per_s": naive,
            "speedup": optimised / naive, "gflops_per_image_with_flip": flops / 1e9,
            "optimised_tflops": flops * optimised / 1e12, "naive_tflops": flops * naive / 1e12,
            "accuracy_vs_fp32": accuracy}


# --------------------------------------------------------------------------------------------------- main

def markdown(results: list[dict]) -> str:
    lines = ["| encoder | optimised img/s | naive img/s | speed-up | GFLOP/img (+flip) | TFLOP/s opt / naive | "
             "max abs diff | max rel diff |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        worst = max(r["accuracy_vs_fp32"].values(), key=lambda a: a["max_rel"])
        lines.append(f"| {r['encoder']} | {r['optimised_img_per_s']:.1f} | {r['naive_img_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['gflops_per_image_with_flip']:.2f} | "
                     f"{r['optimised_tflops']:.1f} / {r['naive_tflops']:.1f} | {worst['max_abs']:.3g} | "
                     f"{worst['max_rel']:.3g} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128, help="texture images per step (x2 with flips)")
    parser.add_argument("--dino-batch", type=int, default=256, help="DINOv2 images per step (x2 with flips)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--naive-steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny networks at 32 px, no compile")
    parser.add_argument("--encoders", default="texture,dinov2", help="which encoders to measure")
    parser.add_argument("--profile", action="store_true", help="print the top device kernels of the optimised paths")
    parser.add_argument("--json", default=None, help="output path (default $OUT/extraction.json)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.resolution, args.batch, args.dino_batch = 32, 4, 4
        args.steps, args.naive_steps, args.warmup, args.compile = 2, 1, 1, False
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images = photo_batch(max(args.batch, args.dino_batch, NAIVE_BATCH), args.resolution)
    benches = {"texture": bench_texture, "dinov2": bench_dino}
    results = [benches[name](args, device, images) for name in args.encoders.split(",")]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "resolution": args.resolution, "batch": args.batch,
              "dino_batch": args.dino_batch, "naive_batch": NAIVE_BATCH, "compile": args.compile,
              "smoke": args.smoke, "results": results}
    print(markdown(results))
    write_json_report(report, "extraction", args.json)
    return report


if __name__ == "__main__":
    main()
