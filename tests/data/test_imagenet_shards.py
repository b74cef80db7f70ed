from __future__ import annotations

import hashlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfd_core.builtin_data import CLASS_NAMES
from sfd_core.config import ConfigError
from sfd_core.imagenet_shards import Config, run
from sfd_core.imaging import center_crop_arr

REPO = Path(__file__).resolve().parents[2]
RES = 32


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _reference_crop(path: Path) -> np.ndarray:
    """torchvision's pil_loader followed by ADM's crop: what the official extractor feeds its encoders."""
    with Image.open(path) as image:
        return np.asarray(center_crop_arr(image.convert("RGB"), RES))


def test_planted_folder_gives_right_shards_labels_and_skips(planted, tmp_path, read_samples):
    root, expected = planted
    cfg = Config(source=str(root), out_url=str(tmp_path / "out"), resolution=RES, image_format="png",
                 images_per_shard=4, num_workers=2)
    manifest = run(cfg)

    assert manifest["counts"]["images"] == len(expected["good"]) == 10
    # 14 items listed (txt excluded) in shards of 4 source items: 4, 4, 4, 2 minus the bad ones.
    assert manifest["counts"]["shards"] == 4 and sum(manifest["counts"]["per_shard"]) == 10
    assert manifest["counts"]["skipped"] == {"decompression_bomb": 1, "empty_file": 1, "truncated": 1,
                                             "undecodable": 1, "unsupported_extension": 1}
    assert {s["path"]: s["reason"] for s in manifest["skipped_files"]} == expected["skipped"]
    assert manifest["stats"]["upscaled"] == len(expected["upscaled"])
    with open(manifest["artifacts"]["classes"]) as f:
        classes = json.load(f)
    assert classes == ["n00000001", "n00000002", "n00000003"]

    samples = read_samples(manifest)
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert sorted(by_source) == expected["good"]
    # Shuffled order (the documented rule, recomputed here): the 14 listed files sorted by blake2b(f"{seed}/{key}");
    # shard k holds files [4k, 4k + 4) of that order minus the bad ones.
    listed = expected["good"] + [p for p, why in expected["skipped"].items() if why != "unsupported_extension"]
    key_of = {rel: expected["keys"].get(rel, Path(rel).stem) for rel in listed}
    order = sorted(listed, key=lambda rel: hashlib.blake2b(f"0/{key_of[rel]}".encode(), digest_size=16).digest())
    windows = [[rel for rel in order[k:k + 4] if rel in expected["good"]] for k in range(0, 14, 4)]
    assert manifest["counts"]["per_shard"] == [len(w) for w in windows]
    assert [json.loads(s["json"])["source"] for s in samples] == [rel for w in windows for rel in w]
    assert [s["__key__"] for s in samples] == [key_of[rel] for w in windows for rel in w]
    for rel, sample in by_source.items():
        meta = json.loads(sample["json"])
        assert int(sample["cls"]) == classes.index(rel.split("/")[0]) and meta["class"] == rel.split("/")[0]
        with Image.open(root / rel) as original:
            assert meta["original_size"] == list(original.size)
        assert meta["source_mode"] == expected["modes"].get(rel, "RGB")
        if meta["source_mode"] == "I;16":  # scaled to 8 bit (PIL's own convert would clip): compare to that
            with Image.open(root / rel) as original:
                eight_bit = np.rint(np.asarray(original, dtype=np.float64) * 255 / 65535).astype(np.uint8)
            reference = np.asarray(center_crop_arr(Image.fromarray(eight_bit).convert("RGB"), RES))
        else:
            reference = _reference_crop(root / rel)
        np.testing.assert_array_equal(_pixels(sample["png"]), reference, err_msg=rel)
    for rel, key in expected["keys"].items():
        assert by_source[rel]["__key__"] == key

    again = run(cfg)  # complete: returns the stored manifest without work
    assert again == manifest

    in_order = run(dataclasses.replace(cfg, out_url=str(tmp_path / "sorted"), shuffle=False))
    sources = [json.loads(s["json"])["source"] for s in read_samples(in_order)]
    assert sources == expected["good"] and in_order["order"]["shuffle"] is False  # ImageFolder order


def _tar_folder(root: Path, tar_path: Path, prefix: str) -> None:
    with tarfile.open(tar_path, "w") as tar:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=f"{prefix}{path.relative_to(root).as_posix()}")


def _tar_of_class_tars(root: Path, tar_path: Path, work: Path) -> None:
    """The layout of ILSVRC2012_img_train.tar: one tar per class, files at the top of each."""
    with tarfile.open(tar_path, "w") as outer:
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            inner_path = work / f"{class_dir.name}.tar"
            with tarfile.open(inner_path, "w") as inner:
                for path in sorted(class_dir.iterdir()):
                    inner.add(path, arcname=path.name)
            outer.add(inner_path, arcname=inner_path.name)


def test_tar_sources_match_the_folder(planted, tmp_path, read_samples):
    root, _ = planted
    common = dict(resolution=RES, image_format="jpg", images_per_shard=6, num_workers=1)
    folder = run(Config(source=str(root), out_url=str(tmp_path / "folder"), **common))
    _tar_folder(root, tmp_path / "train.tar", prefix="train/")
    (tmp_path / "inner").mkdir()
    _tar_of_class_tars(root, tmp_path / "nested.tar", tmp_path / "inner")
    for name in ("train.tar", "nested.tar"):
        other = run(Config(source=str(tmp_path / name), out_url=str(tmp_path / f"out-{name}"), **common))
        assert other["counts"] == folder["counts"], name
        for a, b in zip(read_samples(folder), read_samples(other), strict=True):
            assert (a["__key__"], a["cls"], a["jpg"]) == (b["__key__"], b["cls"], b["jpg"]), name
            assert json.loads(b["json"])["source"] == f"{name}:{json.loads(a['json'])['source']}"


def test_validation_layout_with_label_file(tmp_path, read_samples):
    root = tmp_path / "val"
    root.mkdir()
    rng = np.random.default_rng(0)
    labels = {"ILSVRC2012_val_00000001": "n02", "ILSVRC2012_val_00000002": "n01", "ILSVRC2012_val_00000003": "n02"}
    for stem in [*labels, "ILSVRC2012_val_00000004"]:
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{stem}.JPEG")
    label_file = tmp_path / "LOC_val_solution.csv"
    label_file.write_text("ImageId,PredictionString\n" +
                          "".join(f"{stem},{wnid} 1 2 30 40\n" for stem, wnid in labels.items()))
    manifest = run(Config(source=str(root), out_url=str(tmp_path / "out"), resolution=RES,
                          val_labels_file=str(label_file), num_workers=1))
    assert manifest["counts"]["classes"] == 2 and manifest["counts"]["skipped"] == {"no_label": 1}
    got = {s["__key__"]: int(s["cls"]) for s in read_samples(manifest)}
    assert got == {stem: ["n01", "n02"].index(wnid) for stem, wnid in labels.items()}


def test_missing_source_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"imagenet_shards\.source: .*does not exist"):
        run(Config(source=str(tmp_path / "nowhere"), out_url=str(out)))
    with pytest.raises(ConfigError, match=r"imagenet_shards\.image_format"):
        run(Config(source="builtin:tiny", out_url=str(out), image_format="gif"))
    assert not out.exists()


def _settings(out: Path) -> dict:
    return {"source": "builtin:tiny", "out_url": str(out), "resolution": RES, "builtin_images_per_class": 3,
            "images_per_shard": 2, "num_workers": 2}


def _cli(out: Path) -> list[str]:
    return [sys.executable, "-m", "sfd_core.imagenet_shards", "--config", json.dumps(_settings(out))]


def test_kill_mid_sharding_then_rerun_gives_identical_shards(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    a = run(Config(**_settings(clean)))

    process = subprocess.Popen(_cli(resumed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    first_marker = resumed / "_parts" / "shard-000000.json"
    deadline = time.monotonic() + 120
    while not first_marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the program and its pool workers
    process.wait()
    assert first_marker.exists()
    assert not (resumed / "_SUCCESS.json").exists(), "the run finished before it could be killed"
    done_before = len(list((resumed / "_parts").glob("*.json")))

    subprocess.run(_cli(resumed), check=True, cwd=REPO, env=env, capture_output=True, timeout=120)
    b = json.loads((resumed / "_SUCCESS.json").read_text())
    assert b["counts"] == a["counts"] and a["counts"]["shards"] == 17 > done_before
    assert b["stats"]["images_processed_this_run"] < a["stats"]["images_processed_this_run"] == 33
    for url_a, url_b in zip(a["artifacts"]["shards"], b["artifacts"]["shards"], strict=True):
        assert Path(url_a).read_bytes() == Path(url_b).read_bytes(), url_b


def test_shards_mix_classes_labels_stay_with_their_images(tmp_path, read_samples):
    """Shuffled shards mix classes; each image keeps its key and label (same samples as the sorted run, moved)."""
    common = dict(source="builtin:tiny", resolution=RES, builtin_images_per_class=4, images_per_shard=11,
                  num_workers=1)
    mixed = run(Config(out_url=str(tmp_path / "mixed"), **common))
    plain = run(Config(out_url=str(tmp_path / "plain"), shuffle=False, **common))
    assert mixed["counts"]["per_shard"] == plain["counts"]["per_shard"] == [11, 11, 11, 11]

    def per_shard(manifest):
        from storage.shards import iter_shard
        return [list(iter_shard(url)) for url in manifest["artifacts"]["shards"]]

    mixed_shards, plain_shards = per_shard(mixed), per_shard(plain)
    plain_classes = [len({int(s["cls"]) for s in shard}) for shard in plain_shards]
    mixed_classes = [len({int(s["cls"]) for s in shard}) for shard in mixed_shards]
    assert plain_classes == [3, 4, 4, 3]  # ImageFolder order: 4 images per class, 11 per shard
    assert min(mixed_classes) >= 5, mixed_classes  # 11 of 44 images drawn at random: ~7 classes expected
    assert mixed["stats"]["classes_per_shard"] == mixed_classes
    by_key = {s["__key__"]: s for shard in plain_shards for s in shard}
    mixed_samples = [s for shard in mixed_shards for s in shard]
    assert sorted(s["__key__"] for s in mixed_samples) == sorted(by_key)
    assert [s["__key__"] for s in mixed_samples] != sorted(by_key)
    for sample in mixed_samples:
        assert int(sample["cls"]) == CLASS_NAMES.index(sample["__key__"].rsplit("_", 1)[0])
        assert (sample["cls"], sample["jpg"], sample["json"]) == (by_key[sample["__key__"]]["cls"],
                                                                  by_key[sample["__key__"]]["jpg"],
                                                                  by_key[sample["__key__"]]["json"])

    (tmp_path / "mixed" / "_SUCCESS.json").unlink()  # a resume with another order must not mix the two
    with pytest.raises(RuntimeError, match="different source listing or order"):
        run(Config(out_url=str(tmp_path / "mixed"), shuffle=False, **common))


def _assert_same_shards(remote: dict, local: dict) -> None:
    from storage import fs

    assert remote["counts"] == local["counts"]
    for url_r, url_l in zip(remote["artifacts"]["shards"], local["artifacts"]["shards"], strict=True):
        assert url_r.startswith("s3://") and fs.read_bytes(url_r) == Path(url_l).read_bytes(), url_r


@pytest.mark.s3
def test_sharding_to_s3_survives_a_server_restart_and_resumes_after_a_long_outage(seaweed_s3, monkeypatch,
                                                                                  tmp_path):
    from data_helpers import StageThread, outage_during, wait_for_object
    from storage import fs

    seaweed_s3.apply_env(monkeypatch)
    fs.clear_filesystem_cache()
    common = dict(source="builtin:tiny", resolution=RES, builtin_images_per_class=3, images_per_shard=1,
                  num_workers=1)
    local = run(Config(out_url=str(tmp_path / "local"), **common))
    assert local["counts"]["shards"] == 33

    # The server goes away after the first shard and comes back within the retry window: the run completes.
    url = seaweed_s3.fresh_url("shards-restart")
    stage = StageThread(lambda: run(Config(out_url=url, **common)))
    outage_during(seaweed_s3, stage, fs.join(url, "_parts", "shard-000000.json"))
    _assert_same_shards(stage.result(), local)

    # The server stays down past the retries: the stage fails saying so; a rerun resumes and gives the same shards.
    monkeypatch.setenv("SFD_STORAGE_RETRY_ATTEMPTS", "2")
    url = seaweed_s3.fresh_url("shards-down")
    stage = StageThread(lambda: run(Config(out_url=url, **common)))
    wait_for_object(seaweed_s3, fs.join(url, "_parts", "shard-000000.json"), stage)
    seaweed_s3.stop()
    error = stage.error()
    seaweed_s3.start()
    assert isinstance(error, RuntimeError) and "rerun the stage to resume" in str(error), repr(error)
    assert url in str(error) and "of 33 shards are committed" in str(error)
    monkeypatch.delenv("SFD_STORAGE_RETRY_ATTEMPTS")
    resumed = run(Config(out_url=url, **common))
    assert 0 < resumed["stats"]["images_processed_this_run"] < 33
    _assert_same_shards(resumed, local)
