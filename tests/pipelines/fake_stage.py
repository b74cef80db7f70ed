"""A stage program with the real stage contract and no torch, to test the Dagster layer on its own.

``run(cfg)`` resumes (returns an existing ``_SUCCESS.json``), appends one line per real run (and rank) to
``$FAKE_STAGE_LOG`` (so tests can count runs), reports a log line and a metric through ``sfd_core.reporting``,
sums ``value`` with its upstream totals, and writes one artifact, then the manifest.
"""
from __future__ import annotations

import dataclasses
import io
import os
import time
from dataclasses import dataclass, field

from sfd_core.config import load_config
from sfd_core.reporting import log, metric
from storage import fs
from storage.manifest import read_success, write_success

LOG_ENV = "FAKE_STAGE_LOG"
INPUT_FIELDS = ("shards_url", "features_url", "semvae_url", "texture_url", "semantic_url", "dino_url",
                "model_url", "guidance_model_url", "samples_url", "reference_url")


@dataclass
class Config:
    out_url: str = ""
    source: str = ""
    value: float = 1.0
    items: int = 3
    sleep_s: float = 0.0
    fail: bool = False
    grid: bool = False
    standins: bool = False
    device: str = "cpu"
    safetensors: bool = False          # write a weights file, as the training stages do
    shards_url: str = ""
    features_url: str = ""
    semvae_url: str = ""
    texture_url: str = ""
    semantic_url: str = ""
    dino_url: str = ""
    model_url: str = ""
    guidance_model_url: str = ""
    samples_url: str = ""
    reference_url: str = ""
    # the explicit-checkpoint fields of sfd_core.generate
    checkpoint: str = ""
    model_name: str = ""
    model_overrides: dict = field(default_factory=dict)
    delta_t: float = 0.3
    latent_multiplier: float = 1.0


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (600, 300), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _wait_for_rank_zero(out_url: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (manifest := read_success(out_url)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 never finished {out_url}")
        time.sleep(0.1)
    return manifest


def _record(line: str) -> None:
    if os.environ.get(LOG_ENV):
        with open(os.environ[LOG_ENV], "a") as f:
            f.write(line + "\n")


def run(cfg: Config) -> dict:
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # like a real stage under torchrun: rank 0 writes the manifest
        _record(f"{cfg.out_url}#rank{rank}")
        return _wait_for_rank_zero(cfg.out_url)
    done = read_success(cfg.out_url)
    if done is not None:
        return done
    _record(cfg.out_url)
    if cfg.fail:
        raise RuntimeError("fake stage asked to fail")
    log(f"fake stage: writing {cfg.out_url}")
    time.sleep(cfg.sleep_s)
    metric(7, loss=0.25, img_per_s=123.0)
    upstream, total = {}, cfg.value
    for name in INPUT_FIELDS:
        url = getattr(cfg, name)
        if url:
            manifest = read_success(url)
            upstream[name] = manifest["fingerprint"]
            total += manifest["stats"]["total"]
    artifacts = {"data": fs.join(cfg.out_url, "data.json")}
    fs.write_json(artifacts["data"], {"total": total})
    if cfg.safetensors:
        import numpy as np
        from safetensors.numpy import save

        artifacts["model"] = fs.join(cfg.out_url, "model.safetensors")
        fs.write_bytes(artifacts["model"], save({"w": np.full((2, 2), total, np.float32)}))
    if cfg.grid:
        artifacts["grid"] = fs.join(cfg.out_url, "grid.png")
        fs.write_bytes(artifacts["grid"], _png())
    manifest = {"stage": "fake", "fingerprint": fs.basename(cfg.out_url), "uri": cfg.out_url,
                "counts": {"items": cfg.items}, "stats": {"total": total, "mean": 0.5, "std": 1.0},
                "metrics": {"loss": 0.25, "fid": total}, "artifacts": artifacts,
                "config": dataclasses.asdict(cfg), "upstream": upstream, "code_version": "1",
                "standins": cfg.standins}
    return write_success(cfg.out_url, manifest)


if __name__ == "__main__":
    run(load_config(Config))
