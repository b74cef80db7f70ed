"""Helpers of the training tests: small synthetic stage outputs in the real layouts (Zarr arrays +
_SUCCESS.json manifests) and stage programs run as forked DDP ranks."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import socket
from typing import Any, Callable

import numpy as np

from sfd_core.latent_data import FEATURES_STORE, LATENTS_STORE, array_url, channel_stats
from storage import fs
from storage.arrays import create_array, open_array
from storage.manifest import write_success


def write_arrays(stage_dir: str, store: str, arrays: dict[str, np.ndarray], chunk: int) -> None:
    for name, values in arrays.items():
        created = create_array(array_url(stage_dir, store, name), values.shape, values.dtype, chunks=chunk)
        created[:] = values


def make_texture_stage(stage_dir: str, n: int = 40, channels: int = 4, grid: int = 4, chunk: int = 8,
                       classes: int = 5, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    # Per-channel offsets and scales, so normalisation has something to undo.
    offset = rng.normal(size=(1, channels, 1, 1)) * 3
    scale = rng.uniform(0.5, 2.0, size=(1, channels, 1, 1))
    plain = (rng.normal(size=(n, channels, grid, grid)) * scale + offset).astype(np.float32)
    flipped = plain[..., ::-1].copy()
    labels = rng.integers(0, classes, size=n).astype(np.int64)
    write_arrays(stage_dir, FEATURES_STORE, {"texture": plain, "texture_flip": flipped, "labels": labels}, chunk)
    stats = channel_stats(open_array(array_url(stage_dir, FEATURES_STORE, "texture")))
    write_success(stage_dir, {"stage": "texture_latents", "fingerprint": fs.basename(stage_dir),
                              "uri": stage_dir, "stats": {"texture": stats}, "counts": {"samples": n}})
    return stage_dir


def make_dino_stage(stage_dir: str, n: int = 40, dim: int = 16, grid: int = 4, chunk: int = 8,
                    classes: int = 5, seed: int = 1) -> str:
    """DINOv2-like tokens [N, D, h, w] fp16 with structure: a few shared directions per class plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n).astype(np.int64)
    basis = rng.normal(size=(classes, dim, grid, grid))
    plain = (basis[labels] + 0.3 * rng.normal(size=(n, dim, grid, grid))).astype(np.float16)
    flipped = plain[..., ::-1].copy()
    write_arrays(stage_dir, FEATURES_STORE, {"dino": plain, "dino_flip": flipped, "labels": labels}, chunk)
    write_success(stage_dir, {"stage": "dinov2_features", "fingerprint": fs.basename(stage_dir),
                              "uri": stage_dir, "counts": {"samples": n}})
    return stage_dir


def make_semantic_stage(stage_dir: str, n: int = 40, channels: int = 2, grid: int = 4, chunk: int = 8,
                        seed: int = 2) -> str:
    rng = np.random.default_rng(seed)
    plain = (rng.normal(size=(n, channels, grid, grid)) * 2 + 1).astype(np.float32)
    flipped = plain[..., ::-1].copy()
    write_arrays(stage_dir, LATENTS_STORE, {"semantic": plain, "semantic_flip": flipped}, chunk)
    stats = channel_stats(open_array(array_url(stage_dir, LATENTS_STORE, "semantic")))
    write_success(stage_dir, {"stage": "semantic_latents", "fingerprint": fs.basename(stage_dir),
                              "uri": stage_dir, "stats": {"semantic": stats}, "counts": {"samples": n}})
    return stage_dir


def _rank_main(entry: Callable[[list[str]], Any], cfg: Any, env: dict[str, str]) -> None:
    os.environ.update(env)
    entry(["--config", json.dumps(dataclasses.asdict(cfg))])


def start_program(entry: Callable[[list[str]], Any], cfg: Any, env: dict[str, str] | None = None
                  ) -> multiprocessing.Process:
    """A stage's CLI entry point ``entry(argv)`` in a forked process. Forked, not spawned: the parent's imports
    are reused, which saves seconds per process on the shared test machine."""
    process = multiprocessing.get_context("fork").Process(target=_rank_main, args=(entry, cfg, env or {}))
    process.start()
    return process


def run_ranks(entry: Callable[[list[str]], Any], cfg: Any, world_size: int = 2) -> list[int]:
    """Run ``entry`` as ``world_size`` DDP ranks (gloo) with the environment torchrun would set; exit codes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    ranks = [start_program(entry, cfg, {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world_size),
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(world_size)]
    for process in ranks:
        process.join(timeout=240)
    return [process.exitcode for process in ranks]
