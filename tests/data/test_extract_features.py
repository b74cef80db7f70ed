from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfd_core.config import ConfigError
from sfd_core.encoders import load_dinov2, load_texture_vae
from sfd_core.extract_features import Config, noise_seed, run, sample_noise, stats_rows, to_model_input
from sfd_core.imagenet_shards import Config as ShardsConfig
from sfd_core.imagenet_shards import run as run_shards
from sfd_core.standins import make_standins
from storage import fs
from storage.arrays import open_array
from storage.shards import iter_shard

REPO = Path(__file__).resolve().parents[2]
RES = 32          # stand-ins: f16 texture latent 2x2, DINOv2 grid 2x2
PER_CLASS = 2     # 22 images in shards of 5 (the last one short)


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    return make_standins(tmp_path_factory.mktemp("standins"), seed=0, resolution=RES)


def _shards_config(out_url: str) -> ShardsConfig:
    return ShardsConfig(source="builtin:tiny", out_url=out_url, resolution=RES, builtin_images_per_class=PER_CLASS,
                        images_per_shard=5, num_workers=1)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    return run_shards(_shards_config(str(tmp_path_factory.mktemp("shards") / "imagenet_shards")))


def _config(encoder: str, shards_manifest: dict, out_url: str, standins: dict, **kw) -> Config:
    settings = dict(encoder=encoder, shards_url=shards_manifest["uri"], out_url=out_url,
                    texture_vae=standins["texture_vae"], dinov2=standins["dinov2"], batch_size=3, num_workers=0,
                    device="cpu", chunk_size=4, stats_samples=15, seed=7, standins=True)
    return Config(**{**settings, **kw})


@pytest.fixture(scope="session")
def texture_run(standins, shards, tmp_path_factory):
    """One uninterrupted single-rank texture extraction: the reference the other runs must reproduce."""
    cfg = _config("texture", shards, str(tmp_path_factory.mktemp("texture") / "out"), standins)
    return cfg, run(cfg)


def _arrays(manifest: dict, names=("texture", "texture_flip", "labels")) -> dict[str, np.ndarray]:
    return {name: open_array(manifest["artifacts"][name])[...] for name in names}


def _images_and_labels(shards_manifest: dict) -> tuple[list[Image.Image], list[int]]:
    images, labels = [], []
    for url in shards_manifest["artifacts"]["shards"]:
        for sample in iter_shard(url):
            images.append(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
            labels.append(int(sample["cls"]))
    return images, labels


def _batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])


def test_texture_latents_equal_direct_stand_in_encoding(texture_run, shards, standins):
    cfg, manifest = texture_run
    got = _arrays(manifest)
    images, labels = _images_and_labels(shards)
    n = len(images)
    assert n == 22 and manifest["counts"]["images"] == n and manifest["standins"] is True
    np.testing.assert_array_equal(got["labels"], labels)

    flipped = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]  # flip the picture, then encode
    vae = load_texture_vae(standins["texture_vae"])
    reference64 = copy.deepcopy(vae.autoencoder).double()
    for name, pictures, is_flip in (("texture", images, False), ("texture_flip", flipped, True)):
        x = to_model_input(_batch(pictures))
        # The encoder's public call, one image at a time with its own noise generator.
        direct = torch.cat([vae.encode(x[i:i + 1], generator=torch.Generator().manual_seed(
            noise_seed(cfg.seed, i, is_flip))) for i in range(n)])
        np.testing.assert_allclose(got[name], direct.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
        # float64 reference: mean + std * eps with the same float32 noise.
        posterior = reference64.encode(x.double()).latent_dist
        eps = torch.stack([sample_noise(cfg.seed, i, is_flip, got[name].shape[1:]) for i in range(n)]).double()
        expected = (posterior.mean + posterior.std * eps) * vae.scaling_factor
        np.testing.assert_allclose(got[name], expected.numpy(), rtol=1e-4, atol=2e-5, err_msg=name)
    assert not np.allclose(got["texture"], got["texture_flip"], atol=1e-3)

    # Stats: float64 over the seeded unflipped rows, as ImgLatentDataset.compute_latent_stats does.
    rows = stats_rows(n, cfg.stats_samples, cfg.seed)
    chosen = torch.from_numpy(got["texture"][rows]).double()
    stats = manifest["stats"]["texture"]
    assert stats["samples"] == len(rows) == 15
    np.testing.assert_allclose(stats["mean"], chosen.mean(dim=(0, 2, 3)).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats["std"], chosen.std(dim=(0, 2, 3)).numpy(), rtol=1e-10)
    official = fs.read_json(manifest["artifacts"]["latents_stats"])
    assert np.asarray(official["mean"]).shape == (1, got["texture"].shape[1], 1, 1)
    np.testing.assert_allclose(np.asarray(official["std"]).ravel(), stats["std"])


def test_dino_features_equal_float64_stand_in(standins, shards, tmp_path):
    manifest = run(_config("dinov2", shards, str(tmp_path / "dino"), standins, num_workers=2))
    got = _arrays(manifest, ("dino", "dino_flip", "labels"))
    assert got["dino"].dtype == np.float16
    images, labels = _images_and_labels(shards)
    np.testing.assert_array_equal(got["labels"], labels)
    dino = load_dinov2(standins["dinov2"]).double()
    for name, pictures in (("dino", images),
                           ("dino_flip", [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images])):
        expected = dino.features_from_adm(to_model_input(_batch(pictures)).double()).numpy()
        assert got[name].shape == expected.shape == (22, 64, 2, 2)
        np.testing.assert_allclose(got[name].astype(np.float64), expected, rtol=2e-3, atol=2e-3, err_msg=name)


def test_bad_config_fails_before_work(standins, tmp_path):
    with pytest.raises(ConfigError, match=r"extract_features\.shards_url"):
        run(_config("texture", {"uri": str(tmp_path / "none")}, str(tmp_path / "out"), standins))
    with pytest.raises(ConfigError, match=r"extract_features\.precision"):
        run(_config("texture", {"uri": "x"}, str(tmp_path / "out"), standins, precision="fp8"))
    assert not (tmp_path / "out").exists()


def _cli(cfg: Config) -> list[str]:
    return [sys.executable, "-m", "sfd_core.extract_features", "--config", json.dumps(dataclasses.asdict(cfg))]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_kill_and_resume_gives_identical_arrays(texture_run, tmp_path):
    reference_cfg, reference = texture_run
    cfg = dataclasses.replace(reference_cfg, out_url=str(tmp_path / "out"))
    process = subprocess.Popen(_cli(cfg), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    first_marker = tmp_path / "out" / "_parts" / "chunk-000000.json"
    deadline = time.monotonic() + 120
    while not first_marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert first_marker.exists()
    assert not (tmp_path / "out" / "_SUCCESS.json").exists(), "the run finished before it could be killed"

    resumed = run(cfg)
    assert resumed["stats"]["images_encoded_this_run"] < 22
    for name, values in _arrays(reference).items():
        np.testing.assert_array_equal(_arrays(resumed)[name], values, err_msg=name)
    assert resumed["stats"]["texture"] == reference["stats"]["texture"]


def test_two_ranks_equal_one_rank(texture_run, tmp_path):
    """Rank 1 in a thread (each rank opens its own arrays and markers, as separate processes would;
    threads spare the tests two interpreter starts of torch + diffusers)."""
    reference_cfg, reference = texture_run
    cfg = dataclasses.replace(reference_cfg, out_url=str(tmp_path / "out"), world_size=2)
    with ThreadPoolExecutor(max_workers=1) as pool:
        rank1 = pool.submit(run, dataclasses.replace(cfg, rank=1))
        manifest = run(dataclasses.replace(cfg, rank=0))
        assert rank1.result(timeout=300) == manifest
    assert manifest["stats"]["world_size"] == 2 and 0 < manifest["stats"]["images_encoded_this_run"] < 22
    for name, values in _arrays(reference).items():
        np.testing.assert_array_equal(_arrays(manifest)[name], values, err_msg=name)
    assert manifest["stats"]["texture"] == reference["stats"]["texture"]


def _s3_matches_local(server, monkeypatch, texture_run, standins, num_workers: int) -> None:
    server.apply_env(monkeypatch)
    fs.clear_filesystem_cache()
    reference_cfg, reference = texture_run
    remote_shards = run_shards(_shards_config(server.fresh_url("shards")))
    cfg = dataclasses.replace(reference_cfg, shards_url=remote_shards["uri"], out_url=server.fresh_url("texture"),
                              num_workers=num_workers)
    manifest = run(cfg)
    assert manifest["artifacts"]["texture"].startswith("s3://")
    for name, values in _arrays(reference).items():
        np.testing.assert_array_equal(_arrays(manifest)[name], values, err_msg=name)
    assert manifest["stats"]["texture"] == reference["stats"]["texture"]


def test_s3_moto_root_gives_identical_arrays(moto_s3, monkeypatch, texture_run, standins):
    _s3_matches_local(moto_s3, monkeypatch, texture_run, standins, num_workers=2)  # forked readers on s3


@pytest.mark.s3
def test_s3_seaweedfs_root_gives_identical_arrays(seaweed_s3, monkeypatch, texture_run, standins):
    _s3_matches_local(seaweed_s3, monkeypatch, texture_run, standins, num_workers=0)
