from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfd_core.config import ConfigError
from sfd_core.encoders import load_dinov2, load_texture_vae
from sfd_core.extract_features import (Config, CorruptShardError, noise_seed, run, sample_noise, stats_rows,
                                       to_model_input)
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


def test_torchrun_two_processes_equal_one_process(texture_run, tmp_path):
    """The production launch: ``torchrun --nproc-per-node 2`` on CPU; ranks come from RANK/WORLD_SIZE and take
    disjoint chunk ranges (each marker records its rows; together they tile the array exactly once)."""
    reference_cfg, reference = texture_run
    cfg = dataclasses.replace(reference_cfg, out_url=str(tmp_path / "out"))
    assert cfg.rank is None and cfg.world_size is None
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "sfd_core.extract_features", "--config", json.dumps(dataclasses.asdict(cfg))]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rank 0/2 on cpu: 3 of 6 chunks to do" in done.stdout  # rank 1 (logging only on rank 0) did 3 more
    manifest = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert manifest["stats"]["world_size"] == 2 and manifest["stats"]["images_encoded_this_run"] == 12
    rows = sorted(tuple(json.loads(p.read_text())["rows"]) for p in (tmp_path / "out" / "_parts").glob("chunk-*"))
    assert rows == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 22)]
    for name, values in _arrays(reference).items():
        np.testing.assert_array_equal(_arrays(manifest)[name], values, err_msg=name)
    assert manifest["stats"]["texture"] == reference["stats"]["texture"]


# ------------------------------------------------------------------------------------ damaged shards

def _copy_shards(shards_manifest: dict, dest: Path) -> tuple[dict, list[Path]]:
    """A copy of the imagenet_shards output at ``dest`` (its manifest pointing at the copies)."""
    shutil.copytree(shards_manifest["uri"], dest)
    manifest = json.loads((dest / "_SUCCESS.json").read_text())
    paths = [dest / "shards" / Path(url).name for url in manifest["artifacts"]["shards"]]
    manifest["uri"], manifest["artifacts"]["shards"] = str(dest), [str(p) for p in paths]
    (dest / "_SUCCESS.json").write_text(json.dumps(manifest))
    return manifest, paths


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_truncated_shard_stops_extraction_naming_it_and_a_repaired_rerun_matches(texture_run, shards, tmp_path):
    """Shard 1 cut after its 3rd sample (a header boundary: tarfile reads it as a shorter, valid tar)."""
    reference_cfg, reference = texture_run
    manifest, paths = _copy_shards(shards, tmp_path / "shards")
    original = paths[1].read_bytes()
    members = _members(paths[1])
    keys = list(dict.fromkeys(name.split(".")[0] for name, _ in members))
    _write_members(paths[1], [(n, d) for n, d in members if n.split(".")[0] in keys[:3]])
    cfg = dataclasses.replace(reference_cfg, shards_url=manifest["uri"], out_url=str(tmp_path / "out"))
    with pytest.raises(CorruptShardError, match=rf"{paths[1]}: shard ends after 3 samples, the shards manifest "
                                                 r"says 5 .*delete shard-000001\.json"):
        run(cfg)
    # Chunks 0-1 (rows 0-7: shard 0 and the 3 intact samples of shard 1) were committed; chunk 2 (rows 8-11)
    # needs the missing rows 8-9 and was not: no row was filled from the next shard.
    assert sorted(p.name for p in (tmp_path / "out" / "_parts").glob("chunk-*")) == ["chunk-000000.json",
                                                                                     "chunk-000001.json"]
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()

    paths[1].write_bytes(original)  # the shard rebuilt: the rerun resumes and equals the reference
    resumed = run(cfg)
    assert resumed["stats"]["images_encoded_this_run"] == 22 - 8
    for name, values in _arrays(reference).items():
        np.testing.assert_array_equal(_arrays(resumed)[name], values, err_msg=name)


@pytest.mark.parametrize("damage", ["cut_inside_member", "undecodable_image", "extra_sample", "missing_shard"])
def test_damaged_shard_is_a_clear_error_naming_it(texture_run, shards, tmp_path, damage):
    reference_cfg, _ = texture_run
    manifest, paths = _copy_shards(shards, tmp_path / "shards")
    target = paths[2]  # rows 10-14
    members = _members(target)
    expected = re.escape(str(target))
    if damage == "cut_inside_member":
        data = target.read_bytes()
        target.write_bytes(data[: 512 * 3 + 100])  # into the data of the 2nd member
        expected += r": cannot read sample \d of 5 .*the tar is damaged"
    elif damage == "undecodable_image":
        name = next(n for n, _ in members if n.endswith(".jpg"))
        _write_members(target, [(n, b"not a jpeg" * 20 if n == name else d) for n, d in members])
        expected += rf": sample {name.split('.')[0]!r} \(#0 in the shard\): image cannot be decoded"
    elif damage == "extra_sample":
        _write_members(target, members + [(f"zz_extra.{n.split('.', 1)[1]}", d) for n, d in members[:3]])
        expected += r": shard holds more than the 5 samples"
    else:
        target.unlink()
        expected += r": shard listed in the shards manifest is missing"
    cfg = dataclasses.replace(reference_cfg, shards_url=manifest["uri"], out_url=str(tmp_path / "out"),
                              num_workers=2 if damage == "undecodable_image" else 0)  # also via DataLoader workers
    with pytest.raises(CorruptShardError, match=expected):
        run(cfg)
    # The chunk whose rows meet the damage is never committed (others may be: their rows are intact). An extra
    # sample shows when shard 2 is read to its end, i.e. for row 15 (chunk 3); the other damage hits row 10.
    bad_chunk = 3 if damage == "extra_sample" else 2
    assert not (tmp_path / "out" / "_parts" / f"chunk-{bad_chunk:06d}.json").exists()
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()


def test_inconsistent_shards_manifest_fails_before_work(texture_run, shards, tmp_path):
    reference_cfg, _ = texture_run
    manifest, _ = _copy_shards(shards, tmp_path / "shards")
    manifest["counts"]["per_shard"][0] -= 1
    (tmp_path / "shards" / "_SUCCESS.json").write_text(json.dumps(manifest))
    cfg = dataclasses.replace(reference_cfg, shards_url=manifest["uri"], out_url=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"per-shard counts .* do not add up to counts\.images=22"):
        run(cfg)
    assert not (tmp_path / "out").exists()


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


@pytest.mark.s3
def test_extraction_on_s3_survives_a_server_restart_and_resumes_after_a_long_outage(seaweed_s3, monkeypatch,
                                                                                    texture_run):
    from data_helpers import StageThread, outage_during, wait_for_object

    seaweed_s3.apply_env(monkeypatch)
    fs.clear_filesystem_cache()
    reference_cfg, reference = texture_run
    remote_shards = run_shards(_shards_config(seaweed_s3.fresh_url("shards")))

    def check(manifest: dict) -> None:
        for name, values in _arrays(reference).items():
            np.testing.assert_array_equal(_arrays(manifest)[name], values, err_msg=name)
        assert manifest["stats"]["texture"] == reference["stats"]["texture"]

    # Down after the first chunk is committed, back within the retry window: the run completes, same arrays.
    cfg = dataclasses.replace(reference_cfg, shards_url=remote_shards["uri"], out_url=seaweed_s3.fresh_url("tex"))
    stage = StageThread(lambda: run(cfg))
    outage_during(seaweed_s3, stage, fs.join(cfg.out_url, "_parts", "chunk-000000.json"))
    check(stage.result())

    # Down for good: the stage fails saying so; once the server is back a rerun resumes and gives the same arrays.
    monkeypatch.setenv("SFD_STORAGE_RETRY_ATTEMPTS", "2")
    cfg = dataclasses.replace(cfg, out_url=seaweed_s3.fresh_url("tex-down"))
    stage = StageThread(lambda: run(cfg))
    wait_for_object(seaweed_s3, fs.join(cfg.out_url, "_parts", "chunk-000000.json"), stage)
    seaweed_s3.stop()
    error = stage.error()
    seaweed_s3.start()
    assert isinstance(error, RuntimeError) and "rerun the stage to resume" in str(error), repr(error)
    assert "storage still failing after retries" in str(error) and cfg.out_url in str(error)
    monkeypatch.delenv("SFD_STORAGE_RETRY_ATTEMPTS")
    resumed = run(cfg)
    assert 0 < resumed["stats"]["images_encoded_this_run"] < 22
    check(resumed)
