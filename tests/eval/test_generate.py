"""Generation stage: rank invariance, resume, ADM npz layout, manifest (tiny model + tiny texture VAE stand-in)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sfd_core import generate
from sfd_core.config import ConfigError
from sfd_core.sampling import labels_for_indices
from storage.parts import PartMarkers
from storage.shards import iter_shard

NUM_SAMPLES = 4  # 2 shards of 2: with two ranks, shard 0 on rank 0 and shard 1 on rank 1


def make_config(out_url, standin_specs, model_stages, **overrides) -> generate.Config:
    main, weak = model_stages
    settings = dict(out_url=str(out_url), model_url=main, guidance_model_url=weak, texture_vae=standin_specs["texture_vae"],
                    num_samples=NUM_SAMPLES, per_class=2, num_classes=10, batch_size=2, images_per_shard=2,
                    num_steps=4, cfg_scale=1.5, rank=0, world_size=1, device="cpu", grid_images=4)
    return generate.Config(**{**settings, **overrides})


def shard_bytes(out_url) -> dict[str, bytes]:
    folder = os.path.join(out_url, generate.SAMPLES_DIR)
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def single_rank_run(tmp_path_factory, standins, model_stages):
    out = tmp_path_factory.mktemp("gen") / "single"
    manifest = generate.run(make_config(out, standins, model_stages))
    return str(out), manifest


def test_index_noise_does_not_depend_on_batch_composition():
    together = generate.index_noise(range(0, 5), (3, 2, 2), seed=7)
    apart = torch.cat([generate.index_noise([3, 4], (3, 2, 2), seed=7), generate.index_noise([0], (3, 2, 2), seed=7)])
    assert torch.equal(together[[3, 4, 0]], apart)
    assert not torch.equal(together[0], generate.index_noise([0], (3, 2, 2), seed=8)[0])


def test_two_ranks_write_the_same_samples_as_one(tmp_path, single_rank_run, standins, model_stages):
    single_out, single_manifest = single_rank_run
    out = tmp_path / "two"
    assert generate.run(make_config(out, standins, model_stages, rank=1, world_size=2)) is None
    assert sorted(PartMarkers(str(out)).all()) == ["shard-000001"]  # rank 1 did only its own shard
    manifest = generate.run(make_config(out, standins, model_stages, rank=0, world_size=2))
    assert manifest["counts"] == {"samples": NUM_SAMPLES, "shards": 2}
    assert shard_bytes(str(out)) == shard_bytes(single_out)  # byte-identical PNG shards
    with np.load(manifest["artifacts"]["npz"]) as two, np.load(single_manifest["artifacts"]["npz"]) as one:
        assert np.array_equal(two["arr_0"], one["arr_0"])
        assert len(np.unique(one["arr_0"].reshape(NUM_SAMPLES, -1), axis=0)) == NUM_SAMPLES  # not all alike


def test_resume_skips_written_shards_and_reproduces_files(tmp_path, single_rank_run, standins, model_stages):
    single_out, _ = single_rank_run
    out = tmp_path / "resumed"
    generate.run(make_config(out, standins, model_stages, rank=1, world_size=2))  # a run that stopped early
    kept = os.path.join(out, generate.SAMPLES_DIR, "shard-000001.tar")
    kept_mtime = os.stat(kept).st_mtime_ns
    # A shard that was being written when the run died: present, but without its marker.
    with open(os.path.join(out, generate.SAMPLES_DIR, "shard-000000.tar"), "wb") as f:
        f.write(b"half a tar")
    manifest = generate.run(make_config(out, standins, model_stages))
    assert manifest["metrics"]["generated_this_run"] == NUM_SAMPLES - 2
    assert os.stat(kept).st_mtime_ns == kept_mtime
    assert shard_bytes(str(out)) == shard_bytes(single_out)
    assert generate.run(make_config(out, standins, model_stages)) == manifest  # complete: returned as stored


def test_npz_shards_and_manifest_layout(single_rank_run):
    out, manifest = single_rank_run
    with np.load(manifest["artifacts"]["npz"]) as data:
        assert data.files == ["arr_0"]
        images = data["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (NUM_SAMPLES, 64, 64, 3)
    expected_labels = labels_for_indices(torch.arange(NUM_SAMPLES), 10, 2, 0).tolist()
    seen = []
    for url in manifest["artifacts"]["shards"]:
        for sample in iter_shard(url):
            index = int(sample["__key__"])
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")), images[index])
            assert int(sample["cls"]) == expected_labels[index]
            seen.append(index)
    assert seen == list(range(NUM_SAMPLES))  # index order across shards
    grid = np.asarray(Image.open(manifest["artifacts"]["grid"]))
    assert grid.shape == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2, 3)  # 4 images in a 2x2 grid with 2 px borders
    assert manifest["standins"] is True  # the model manifests say so
    assert manifest["upstream"] == {"sfd_model": "main0000", "autoguidance_model": "weak0000"}
    assert manifest["metrics"]["nfe_per_sample"] == 3.0  # 4 Euler grid points = 3 updates
    assert manifest["metrics"]["img_per_s"] > 0


def test_explicit_checkpoint_matches_manifest_run(tmp_path, single_rank_run, standins, model_stages):
    """The same network given as checkpoint + spec + official latents_stats.pt gives the same images."""
    from storage.manifest import read_success

    _, single_manifest = single_rank_run
    main, weak = (read_success(url) for url in model_stages)
    stats = main["stats"]["texture"]
    stats_path = tmp_path / "latents_stats.pt"
    torch.save({"mean": torch.tensor(stats["mean"]).view(1, -1, 1, 1),
                "std": torch.tensor(stats["std"]).view(1, -1, 1, 1)}, stats_path)
    cfg = make_config(tmp_path / "explicit", standins, model_stages, model_url="", guidance_model_url="",
                      checkpoint=main["artifacts"]["ema"], model_name=main["model"]["name"],
                      model_overrides=main["model"]["overrides"], texture_stats=str(stats_path),
                      guidance_checkpoint=weak["artifacts"]["ema"], guidance_model_name=weak["model"]["name"],
                      guidance_model_overrides=weak["model"]["overrides"], num_samples=2, standins=True)
    manifest = generate.run(cfg)
    with np.load(manifest["artifacts"]["npz"]) as explicit, np.load(single_manifest["artifacts"]["npz"]) as staged:
        assert np.array_equal(explicit["arr_0"], staged["arr_0"][:2])


def test_config_errors_name_the_field(tmp_path, standins, model_stages):
    with pytest.raises(ConfigError, match="method"):
        generate.run(make_config(tmp_path / "x", standins, model_stages, method="rk45"))
    with pytest.raises(ConfigError, match="exactly one of model_url"):
        generate.run(make_config(tmp_path / "y", standins, model_stages, checkpoint="w.safetensors"))


def test_rank_zero_gives_up_on_missing_shards(tmp_path):
    with pytest.raises(TimeoutError, match="shard-000001"):
        generate.wait_for_shards(str(tmp_path), ["shard-000000", "shard-000001"], timeout_s=0.0)


def test_streaming_npz_equals_numpy_savez(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (5, 4, 3, 3), dtype=np.uint8)
    path = str(tmp_path / "a.npz")
    generate.write_npz_streaming(path, "arr_0", data.shape, np.uint8, iter([data[:2], data[2:]]))
    with np.load(path) as loaded:
        assert np.array_equal(loaded["arr_0"], data)
    with pytest.raises(ValueError, match="promised"):
        generate.write_npz_streaming(path, "arr_0", data.shape, np.uint8, iter([data[:2]]))


def test_generate_to_s3(moto_s3, monkeypatch, single_rank_run, standins, model_stages):
    """Shards, markers, npz and grid go through fsspec to a real S3 endpoint and equal the local run's."""
    from storage import fs

    moto_s3.apply_env(monkeypatch)
    _, local = single_rank_run
    manifest = generate.run(make_config(moto_s3.url("samples"), standins, model_stages, num_samples=2))
    assert manifest["artifacts"]["npz"].startswith("s3://") and fs.exists(manifest["artifacts"]["grid"])
    with np.load(io.BytesIO(fs.read_bytes(manifest["artifacts"]["npz"]))) as remote, \
            np.load(local["artifacts"]["npz"]) as local_npz:
        assert np.array_equal(remote["arr_0"], local_npz["arr_0"][:2])


def test_dopri5_per_phase_option_reaches_the_sampler(tmp_path, standins, model_stages):
    # Same noise and labels: the two dopri5 variants integrate the same ODE, so the images agree closely but the
    # per-phase solve needs its own evaluations (it restarts at each phase boundary).
    runs = {}
    for per_phase in (False, True):
        cfg = make_config(str(tmp_path / f"per_phase_{per_phase}"), standins, model_stages, num_samples=4,
                          method="dopri5", dopri5_per_phase=per_phase)
        runs[per_phase] = generate.run(cfg)
    assert runs[True]["config"]["dopri5_per_phase"] is True
    nfe = {k: runs[k]["metrics"]["nfe_per_sample"] for k in runs}
    assert nfe[True] != nfe[False]
