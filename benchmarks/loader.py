"""Can the Zarr latent loader feed SFD training? Loader img/s vs the XL/1 train step img/s, in one run.

Writes a dataset with the real per-sample sizes to local disk, laid out as the stages write it (texture
[N, 32, 16, 16] float32, semantic [N, 16, 16, 16] float32, DINOv2 [N, 768, 16, 16] float16, each with its flip
array, chunks of 256 rows, zstd-1; labels [N]), then measures on one process (= one GPU rank):

1. loader: ``StreamBatches`` over ``SFDLatentDataset`` (one stream, micro-batch = the per-GPU batch), for several
   DataLoader worker counts: time to the first batch and steady img/s over the rest of an epoch;
2. step: ``SFDTrainer.train_step`` of the trainer (LightningDiT-XL/1, bf16 autocast on CUDA, REPA, EMA) on
   synthetic on-device batches;
3. end to end: the train step fed by the loader (host-to-device copies included).

    python benchmarks/loader.py                # CUDA: N=16384, XL/1, batch 32, workers 0 2 4 8
    python benchmarks/loader.py --smoke        # CPU smoke check: small N, narrow features, tiny model

Prints a summary; writes JSON to $OUT/loader.json when OUT is set (or to --json).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_json_report  # noqa: E402
from sfd_core.latent_data import (FEATURES_STORE, LATENTS_STORE, LatentSources, SFDLatentDataset,  # noqa: E402
                                  StreamBatches, array_url, sfd_plan)
from sfd_core.models import model_config  # noqa: E402
from sfd_core.train_sfd import Config, SFDTrainer, peak_flops, resolve_config, train_flops_per_image  # noqa: E402
from storage.arrays import create_array  # noqa: E402

# (stage dir name, store, array name, channels, dtype) of the SFD training inputs.
LAYOUT = [("texture", FEATURES_STORE, "texture", 32, "float32"),
          ("semantic", LATENTS_STORE, "semantic", 16, "float32"),
          ("dino", FEATURES_STORE, "dino", 768, "float16")]


def write_dataset(root: str, n: int, chunk: int, grid: int, dino_dim: int) -> LatentSources:
    """Random data in the stage layouts. A few distinct random chunks are cycled: content does not change the
    cost of reading (random values barely compress either way), and it keeps the write short."""
    rng = np.random.default_rng(0)
    for stage, store, name, channels, dtype in LAYOUT:
        channels = dino_dim if stage == "dino" else channels
        patterns = [rng.standard_normal((chunk, channels, grid, grid), dtype=np.float32).astype(dtype)
                    for _ in range(3)]
        for suffix in ("", "_flip"):
            array = create_array(array_url(os.path.join(root, stage), store, name + suffix),
                                 (n, channels, grid, grid), dtype, chunks=chunk)
            for i, start in enumerate(range(0, n, chunk)):
                array[start:start + chunk] = patterns[i % 3][:min(chunk, n - start)]
    labels = create_array(array_url(os.path.join(root, "texture"), FEATURES_STORE, "labels"), (n,), "int64",
                          chunks=n)
    labels[:] = rng.integers(0, 1000, size=n)
    unit = {"mean": [0.0], "std": [1.0]}
    return LatentSources(texture_url=os.path.join(root, "texture"), semantic_url=os.path.join(root, "semantic"),
                         dino_url=os.path.join(root, "dino"), texture_stats={k: v * 32 for k, v in unit.items()},
                         semantic_stats={k: v * 16 for k, v in unit.items()})


def bytes_per_sample(dino_dim: int, grid: int) -> int:
    """Bytes of one sample's picked variant (what a window keeps)."""
    return grid * grid * (32 * 4 + 16 * 4 + dino_dim * 2) + 8


def measure_loader(sources: LatentSources, batch: int, window: int, workers: int) -> dict[str, float]:
    plan = sfd_plan(sources, batch_size=batch, num_streams=1, seed=0, shuffle_window=window)
    steps = plan.steps_per_epoch(0)
    batches = StreamBatches([SFDLatentDataset(sources, plan, 0)], num_workers=workers)
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps - 1):
        next(batches)
    steady = time.perf_counter() - start
    batches.close()
    return {"workers": workers, "first_batch_s": first, "img_per_s": (steps - 1) * batch / steady,
            "batches": steps}


def make_trainer(model: str, overrides: dict, batch: int, device: torch.device, compile_model: bool
                 ) -> SFDTrainer:
    cfg = resolve_config(Config(out_url="benchmark", texture_url="-", semantic_url="-", dino_url="-",
                                recipe="main", model=model, model_overrides=overrides, global_batch=batch,
                                compile=compile_model, device=device.type))
    return SFDTrainer(cfg, {**overrides, "class_dropout_prob": cfg.class_dropout,
                            "repa_depth": cfg.repa_depth, "use_repa": True}, device, distributed=False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(trainer: SFDTrainer, batch: int, channels: int, grid: int, dino_dim: int, steps: int,
                 warmup: int) -> float:
    device = trainer.device
    x = torch.randn(batch, channels, grid, grid, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    dino = torch.randn(batch, dino_dim, grid, grid, device=device)
    generator = torch.Generator().manual_seed(0)
    for _ in range(warmup):
        trainer.train_step([(x, labels, dino)], [generator])
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step([(x, labels, dino)], [generator])
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def measure_end_to_end(trainer: SFDTrainer, sources: LatentSources, batch: int, window: int, workers: int,
                       steps: int, warmup: int) -> float:
    plan = sfd_plan(sources, batch_size=batch, num_streams=1, seed=0, shuffle_window=window)
    batches = StreamBatches([SFDLatentDataset(sources, plan, 0)], num_workers=workers)
    generator = torch.Generator().manual_seed(0)
    for _ in range(warmup):
        trainer.train_step(next(batches), [generator])
    synchronize(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches), [generator])
    synchronize(trainer.device)
    seconds = time.perf_counter() - start
    batches.close()
    return steps * batch / seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU smoke check with small sizes")
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=32, help="per-GPU batch (global 256 over 8 GPUs)")
    parser.add_argument("--window", type=int, default=4096, help="shuffle window in samples")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--model", default="LightningDiT-XL/1")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--data-dir", default=None, help="where to write the dataset (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    chunk, grid, dino_dim = 256, 16, 768
    if args.smoke:
        args.samples, args.batch, args.window, args.workers = 256, 8, 64, [0, 2]
        args.model, args.steps, args.warmup, chunk, dino_dim = "LightningDiT-tiny/1", 2, 1, 32, 64
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    root = args.data_dir or tempfile.mkdtemp(prefix="sfd-loader-bench-")
    try:
        start = time.perf_counter()
        sources = write_dataset(root, args.samples, chunk, grid, dino_dim)
        write_s = time.perf_counter() - start
        print(f"dataset: {args.samples} samples x {bytes_per_sample(dino_dim, grid) / 1e3:.0f} kB (picked variant) "
              f"written in {write_s:.1f} s to {root}", flush=True)
        loader = []
        for workers in args.workers:
            loader.append(measure_loader(sources, args.batch, args.window, workers))
            print(f"loader  workers={workers}: {loader[-1]['img_per_s']:.0f} img/s "
                  f"(first batch {loader[-1]['first_batch_s']:.2f} s)", flush=True)
        best = max(loader, key=lambda r: r["img_per_s"])

        overrides = {"in_channels": 48, "semantic_channels": 16, "input_size": grid, "repa_out_dim": dino_dim}
        trainer = make_trainer(args.model, overrides, args.batch, device, args.compile)
        step_img_s = measure_step(trainer, args.batch, 48, grid, dino_dim, args.steps, args.warmup)
        print(f"step    {args.model}: {step_img_s:.1f} img/s", flush=True)
        e2e_img_s = measure_end_to_end(trainer, sources, args.batch, args.window, best["workers"], args.steps,
                                       args.warmup)
        print(f"end2end workers={best['workers']}: {e2e_img_s:.1f} img/s", flush=True)
        flops = train_flops_per_image(model_config(args.model, **overrides, use_repa=True))
        peak = peak_flops(device)
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "smoke": args.smoke, "model": args.model, "compile": args.compile,
            "samples": args.samples, "batch": args.batch, "window": args.window, "chunk": chunk,
            "bytes_per_sample": bytes_per_sample(dino_dim, grid), "dataset_write_s": write_s,
            "loader": loader, "loader_best_img_per_s": best["img_per_s"],
            "loader_best_mb_per_s": best["img_per_s"] * bytes_per_sample(dino_dim, grid) / 1e6,
            "step_img_per_s": step_img_s, "end_to_end_img_per_s": e2e_img_s,
            "loader_over_step": best["img_per_s"] / step_img_s,
            "train_flops_per_image": flops, "step_mfu": step_img_s * flops / peak if peak else None,
            "cpu_count": os.cpu_count(),
        }
        verdict = "keeps up with" if result["loader_over_step"] >= 1 else "is SLOWER than"
        print(f"the loader ({best['img_per_s']:.0f} img/s) {verdict} the train step ({step_img_s:.0f} img/s)")
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    write_json_report(result, "loader", args.json)
    return result


if __name__ == "__main__":
    main()
