"""CPU throughput of the imagenet_shards stage on a synthetic ImageNet-like folder.

The folder holds JPEGs (quality 90) at ImageNet-like sizes (short side 300-500, long side up to 500, about
400x350 on average) cut from the builtin photos, so decoding sees real image content. Two numbers:

- per core: ``prepare_sample`` (decode, ADM crop to 256, JPEG q95 encode) in one process on bytes in memory;
- the stage: ``imagenet_shards.run`` end to end (listing, process pool, shard writes, markers) for each worker
  count in ``--workers``; images/s overall and per worker.

    python benchmarks/sharding.py --images 600 --workers 1 2

Prints a Markdown table; writes JSON to $OUT/sharding.json when OUT is set (or to --json).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_json_report  # noqa: E402
from sfd_core.builtin_data import CLASS_NAMES, load_photo  # noqa: E402
from sfd_core.imagenet_shards import Config, CropSettings, _init_worker, prepare_sample, run  # noqa: E402


def make_folder(root: Path, images: int, seed: int = 0) -> list[Path]:
    """``root/<wnid>/<wnid>_<i>.JPEG``, one class per builtin photo."""
    rng = np.random.default_rng(seed)
    photos = {name: load_photo(name) for name in CLASS_NAMES}
    paths = []
    for i in range(images):
        label = i % len(CLASS_NAMES)
        photo = photos[CLASS_NAMES[label]]
        short, long = int(rng.integers(300, 501)), 500
        size = (long, short) if rng.random() < 0.75 else (short, long)  # mostly landscape, as in ImageNet
        w, h = photo.size
        cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        wnid = f"n{label:08d}"
        path = root / wnid / f"{wnid}_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def per_core_rate(paths: list[Path], resolution: int, repeats: int = 1) -> float:
    """Images/s of decode + crop + encode in this process (bytes already in memory)."""
    _init_worker(CropSettings(resolution, "jpg", 95))
    payloads = [p.read_bytes() for p in paths]
    start = time.perf_counter()
    for _ in range(repeats):
        for i, data in enumerate(payloads):
            result = prepare_sample((i, f"k{i}", str(i), data))
            assert result["ok"]
    return len(payloads) * repeats / (time.perf_counter() - start)


def stage_rate(source: Path, out: Path, workers: int, resolution: int, images_per_shard: int) -> dict:
    start = time.perf_counter()
    manifest = run(Config(source=str(source), out_url=str(out), resolution=resolution, num_workers=workers,
                          images_per_shard=images_per_shard))
    wall = time.perf_counter() - start
    images = manifest["counts"]["images"]
    return {"workers": workers, "images": images, "wall_s": wall, "img_per_s_wall": images / wall,
            "img_per_s_processing": manifest["stats"]["throughput_img_per_s"],
            "img_per_s_per_worker": manifest["stats"]["throughput_img_per_s_per_worker"],
            "shard_mb": sum(manifest["stats"]["shard_bytes"]) / 2**20}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--images-per-shard", type=int, default=200)
    parser.add_argument("--json", default=None, help="output path (default $OUT/sharding.json)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sfd-sharding-bench-") as tmp:
        source = Path(tmp) / "imagenet"
        paths = make_folder(source, args.images)
        mean_size = np.mean([Image.open(p).size for p in paths[:200]], axis=0).round().tolist()
        folder_mb = sum(p.stat().st_size for p in paths) / 2**20
        core = per_core_rate(paths[: min(len(paths), 200)], args.resolution)
        stages = [stage_rate(source, Path(tmp) / f"out-{w}", w, args.resolution, args.images_per_shard)
                  for w in args.workers]
    report = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "load_average_1min": os.getloadavg()[0], "images": args.images, "mean_source_size_wh": mean_size,
              "source_mb": folder_mb, "resolution": args.resolution, "per_core_img_per_s": core, "stage": stages}
    lines = [f"per core (decode + ADM crop + JPEG q95, in process): {core:.1f} img/s "
             f"(source {mean_size[0]:.0f}x{mean_size[1]:.0f} JPEG q90)",
             "| workers | images | wall s | img/s (wall) | img/s (processing) | img/s per worker |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s['workers']} | {s['images']} | {s['wall_s']:.1f} | {s['img_per_s_wall']:.1f} | "
              f"{s['img_per_s_processing']:.1f} | {s['img_per_s_per_worker']:.1f} |" for s in stages]
    print("\n".join(lines))
    write_json_report(report, "sharding", args.json)
    return report


if __name__ == "__main__":
    main()
