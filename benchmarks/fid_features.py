"""Throughput of the FID stage on one device: Inception feature extraction and the metric computations.

Inception is torch-fidelity's ``inception-v3-compat`` at real size with random weights (the stand-in recipe),
loaded through ``sfd_core.fid.load_inception``; it resizes every image to 299 internally, so the cost per image
hardly depends on the input size. Three numbers:

1. extractor: img/s on uint8 batches already on the device (the network alone);
2. stage path: img/s through ``fid.ShardImages`` (PNG shards on local disk, decoded in DataLoader workers) ->
   ``fid.iter_features``, for each worker count in ``--workers``: what ``fid_report`` / ``fid_reference`` see;
3. metrics: seconds for ``fid.frechet_distance`` at 2048-d and for ``fid.precision_recall`` with ADM's sizes
   (10k reference, 50k samples) on random features.

Images are ADM crops of the builtin photos (real image statistics). Extrapolation: 50K samples / stage img/s.

    python benchmarks/fid_features.py               # on a GPU
    python benchmarks/fid_features.py --smoke       # CPU, 64 px, a few images: checks the script runs

Prints a Markdown table; writes JSON to $OUT/fid_features.json when OUT is set (or to --json).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_json_report  # noqa: E402
from sfd_core import fid  # noqa: E402
from sfd_core.builtin_data import iter_builtin  # noqa: E402
from sfd_core.encoders.inception import random_inception_state_dict  # noqa: E402
from sfd_core.imaging import center_crop_arr, encode_image  # noqa: E402
from storage.shards import write_shard  # noqa: E402

TOTAL_SAMPLES = 50_000


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def photo_crops(count: int, resolution: int) -> np.ndarray:
    """uint8 [count, R, R, 3]: ADM crops of the builtin photos, repeated to fill."""
    crops = [np.array(center_crop_arr(s.image, resolution)) for s in iter_builtin(2, seed=0)]
    return np.stack([crops[i % len(crops)] for i in range(count)])


def write_png_shards(directory: str, images: np.ndarray, per_shard: int) -> list[str]:
    from PIL import Image

    urls = []
    for shard, start in enumerate(range(0, len(images), per_shard)):
        url = os.path.join(directory, f"shard-{shard:06d}.tar")
        write_shard(url, ({"__key__": f"{start + i:06d}", "png": encode_image(Image.fromarray(image), "png")}
                          for i, image in enumerate(images[start:start + per_shard])))
        urls.append(url)
    return urls


def bench_extractor(extractor, images: np.ndarray, batch: int, steps: int, device: torch.device) -> float:
    on_device = torch.from_numpy(images[:batch]).permute(0, 3, 1, 2).contiguous().to(device)
    with torch.no_grad():
        extractor(on_device)  # warm-up (cuDNN autotuning, allocator)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            extractor(on_device)
        synchronize(device)
    return batch * steps / (time.perf_counter() - started)


def bench_stage_path(extractor, urls: list[str], batch: int, workers: int, device: torch.device) -> float:
    loader = fid.image_batches(fid.ShardImages(urls), batch, workers)
    started = time.perf_counter()
    count = sum(len(pool) for _, pool, _ in fid.iter_features(loader, extractor, device, desc="bench"))
    synchronize(device)
    return count / (time.perf_counter() - started)


def bench_metrics(real: int, fake: int, device: torch.device) -> dict[str, float]:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, fid.POOL_DIM, 64))
    sigma1, sigma2 = a @ a.T + np.eye(fid.POOL_DIM), b @ b.T + np.eye(fid.POOL_DIM)
    started = time.perf_counter()
    fid.frechet_distance(np.zeros(fid.POOL_DIM), sigma1, np.ones(fid.POOL_DIM), sigma2)
    fid_seconds = time.perf_counter() - started
    real_features = rng.normal(size=(real, fid.POOL_DIM)).astype(np.float32)
    fake_features = rng.normal(size=(fake, fid.POOL_DIM)).astype(np.float32)
    synchronize(device)
    started = time.perf_counter()
    fid.precision_recall(real_features, fake_features, k=3, device=device)
    synchronize(device)
    return {"frechet_distance_seconds": fid_seconds, "precision_recall_seconds": time.perf_counter() - started,
            "prc_real": real, "prc_fake": fake}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| measurement | img/s | 50K samples (min) |", "|---|---|---|",
             f"| extractor only (batch {report['batch']}, on device) | {report['extractor_img_per_s']:.1f} | "
             f"{TOTAL_SAMPLES / report['extractor_img_per_s'] / 60:.1f} |"]
    for workers, rate in report["stage_img_per_s"].items():
        lines.append(f"| stage path: PNG shards, {workers} workers | {rate:.1f} | {TOTAL_SAMPLES / rate / 60:.1f} |")
    m = report["metrics"]
    lines += ["", f"FID at 2048-d: {m['frechet_distance_seconds']:.2f} s; precision/recall "
                  f"{m['prc_real']} real x {m['prc_fake']} generated: {m['precision_recall_seconds']:.2f} s."]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, 64 px, a few images")
    parser.add_argument("--device", default=None)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=4096, help="images in the PNG shards of the stage path")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8])
    parser.add_argument("--prc-real", type=int, default=10_000)
    parser.add_argument("--prc-fake", type=int, default=50_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.resolution, args.batch, args.steps, args.images, args.workers = 64, 4, 1, 8, [0]
        args.prc_real, args.prc_fake = 64, 96
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images = photo_crops(max(args.images, args.batch), args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "inception_random.pth")
        torch.save(random_inception_state_dict(seed=0), weights)
        extractor, _ = fid.load_inception(weights, device)
        urls = write_png_shards(os.path.join(tmp, "shards"), images[:args.images], per_shard=max(args.images // 8, 1))
        report = {
            "benchmark": "fid_features", "smoke": args.smoke, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
            "resolution": args.resolution, "batch": args.batch, "images": args.images,
            "extractor_img_per_s": bench_extractor(extractor, images, args.batch, args.steps, device),
            "stage_img_per_s": {w: bench_stage_path(extractor, urls, args.batch, w, device) for w in args.workers},
            "metrics": bench_metrics(args.prc_real, args.prc_fake, device),
        }
    print(markdown(report))
    write_json_report(report, "fid_features", args.json)
    return report


if __name__ == "__main__":
    main()
