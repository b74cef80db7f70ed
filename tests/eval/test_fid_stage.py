"""FID stage end to end on the random-init Inception stand-in (64 px images, <= 12 per set: Inception is the cost)."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from eval_helpers import smooth_images
from PIL import Image

from sfd_core import fid, generate
from sfd_core.config import ConfigError
from sfd_core.encoders.inception import random_inception_state_dict
from sfd_core.imaging import encode_image
from storage.manifest import write_success
from storage.shards import write_shard

NUM_REAL = 12


def write_image_shards(directory, images: np.ndarray, per_shard: int) -> str:
    """A stage dir laid out like imagenet_shards (PNG shards listed in artifacts.shards)."""
    out = str(directory)
    urls = []
    for shard, start in enumerate(range(0, len(images), per_shard)):
        url = os.path.join(out, "shards", f"shard-{shard:06d}.tar")
        write_shard(url, ({"__key__": f"img{start + i:04d}", "png": encode_image(Image.fromarray(image), "png"),
                           "cls": 0} for i, image in enumerate(images[start:start + per_shard])))
        urls.append(url)
    return write_success(out, {"stage": "imagenet_shards", "fingerprint": os.path.basename(out), "uri": out,
                               "artifacts": {"shards": urls}, "standins": False})["uri"]


@pytest.fixture(scope="module")
def real_images():
    return smooth_images(NUM_REAL, seed=10)


@pytest.fixture(scope="module")
def reference_stage(tmp_path_factory, real_images, standins):
    root = tmp_path_factory.mktemp("fid")
    shards = write_image_shards(root / "shards0", real_images, per_shard=5)  # 3 shards: 5 + 5 + 2
    cfg = fid.Config(mode="reference", out_url=str(root / "ref0"), shards_url=shards,
                     inception_weights=standins["inception"], standins=True, device="cpu", batch_size=8)
    manifest = fid.run(cfg)
    return manifest, fid.load_reference(manifest["artifacts"]["reference_stats"])


@pytest.fixture(scope="module")
def inception(standins):
    extractor, _ = fid.load_inception(standins["inception"])
    return extractor


def test_reference_from_shards_is_float64_statistics_of_all_images(reference_stage):
    manifest, reference = reference_stage
    assert manifest["counts"] == {"images": NUM_REAL, "pool_features": NUM_REAL}
    assert manifest["standins"] is True and manifest["stats"]["source"] == "imagenet_shards"
    pool = reference["pool"]
    assert pool.shape == (NUM_REAL, fid.POOL_DIM) and pool.std(0).mean() > 1e-3  # stand-in features not collapsed
    assert reference["mu"].dtype == reference["sigma"].dtype == np.float64
    np.testing.assert_allclose(reference["mu"], pool.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(reference["sigma"], np.cov(pool.astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-12)


def test_adm_npz_import_equals_direct_statistics(tmp_path, reference_stage, real_images, standins):
    _, direct = reference_stage
    npz = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(npz, arr_0=real_images, mu=direct["mu"], sigma=direct["sigma"])  # the ADM reference-batch layout
    manifest = fid.run(fid.Config(mode="reference", out_url=str(tmp_path / "adm"), adm_npz_url=str(npz),
                                  inception_weights=standins["inception"], device="cpu", batch_size=8,
                                  reference_pool_features=6))
    imported = fid.load_reference(manifest["artifacts"]["reference_stats"])
    assert manifest["stats"]["source"] == "adm_npz" and manifest["counts"]["pool_features"] == 6
    assert np.array_equal(imported["mu"], direct["mu"]) and np.array_equal(imported["sigma"], direct["sigma"])
    # arr_0 (in memory) and the PNG shards (decoded) are the same pixels, so the same pool features.
    np.testing.assert_allclose(imported["pool"], direct["pool"][:6], rtol=1e-5, atol=1e-5)
    assert int(imported["count"]) == -1  # ADM's npz does not say how many images made mu/sigma


def test_adm_npz_float32_mu_and_no_images(tmp_path, reference_stage, standins):
    """An npz with float32 mu (torch-fidelity's cache dtype) and no arr_0: stored as float64, no pool features."""
    _, direct = reference_stage
    npz = tmp_path / "stats_only.npz"
    np.savez(npz, mu=direct["mu"].astype(np.float32), sigma=direct["sigma"])
    manifest = fid.run(fid.Config(mode="reference", out_url=str(tmp_path / "adm"), adm_npz_url=str(npz),
                                  inception_weights=standins["inception"], device="cpu"))
    imported = fid.load_reference(manifest["artifacts"]["reference_stats"])
    assert imported["mu"].dtype == np.float64 and imported["pool"].shape == (0, fid.POOL_DIM)
    np.testing.assert_array_equal(imported["mu"], direct["mu"].astype(np.float32).astype(np.float64))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(reference_stage, real_images, inception):
    _, reference = reference_stage
    rng = np.random.default_rng(11)
    cfg = fid.Config(kid_subsets=10)
    same = fid.compute_metrics({"pool": reference["pool"], "logits": np.zeros((NUM_REAL, 1008), np.float32)},
                               reference, cfg)
    # ~0 up to the square roots of round-off eigenvalues (2048 dims, rank 11).
    assert abs(same["fid"]) < 1e-4 * np.trace(reference["sigma"])
    assert same["precision"] == same["recall"] == 1.0
    fids = []
    for noise in (12.0, 60.0):
        subset = real_images[:8]
        noisy = np.clip(subset + rng.normal(0, noise, subset.shape), 0, 255).astype(np.uint8)
        features = fid.extract_all(fid.image_batches(fid.ArrayImages(noisy), 8, 0), inception, "cpu")
        fids.append(fid.compute_metrics(features, reference, cfg)["fid"])
    assert same["fid"] + 1e-3 < fids[0] < fids[1]


def test_report_on_generated_samples(tmp_path, reference_stage, standins, model_stages):
    main, weak = model_stages
    samples = generate.run(generate.Config(
        out_url=str(tmp_path / "samples"), model_url=main, guidance_model_url=weak,
        texture_vae=standins["texture_vae"], num_samples=6, per_class=3, num_classes=10, batch_size=3,
        images_per_shard=3, num_steps=3, cfg_scale=1.5, rank=0, world_size=1, device="cpu", grid_images=4))
    reference_manifest, _ = reference_stage
    cfg = fid.Config(mode="report", out_url=str(tmp_path / "report"), samples_url=samples["uri"],
                     reference_url=reference_manifest["uri"], inception_weights=standins["inception"],
                     device="cpu", batch_size=8, kid_subsets=5)
    manifest = fid.run(cfg)
    metrics = json.loads(open(manifest["artifacts"]["metrics"]).read())
    assert metrics["num_samples"] == 6 and metrics["num_reference"] == NUM_REAL and metrics["standins"] is True
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert metrics["kid_subset_size"] == 6 and np.isfinite(metrics["kid_mean"])
    assert manifest["metrics"]["fid"] == metrics["fid"]
    assert manifest["upstream"] == {"sfd_samples": samples["fingerprint"],
                                    "fid_reference": reference_manifest["fingerprint"]}
    report = open(manifest["artifacts"]["report"]).read()
    assert "Stand-in networks were used" in report and f"| {metrics['fid']:.4f} |" in report
    assert "![samples](grid.png)" in report
    with open(manifest["artifacts"]["grid"], "rb") as copied, open(samples["artifacts"]["grid"], "rb") as source:
        assert copied.read() == source.read()
    # A report with another Inception than the reference's would compare unrelated features: refused.
    torch.save(random_inception_state_dict(seed=99), tmp_path / "other.pth")
    other = dataclasses.replace(cfg, out_url=str(tmp_path / "other"), inception_weights=str(tmp_path / "other.pth"))
    with pytest.raises(ConfigError, match="inception_weights differ"):
        fid.run(other)


def test_reference_mode_needs_exactly_one_source(tmp_path, standins):
    with pytest.raises(ConfigError, match="exactly one"):
        fid.run(fid.Config(mode="reference", out_url=str(tmp_path / "r"), inception_weights=standins["inception"]))
