"""Asset checks from manifests: each check passes on a sound manifest and fails, saying why, on a broken one."""
import math

import numpy as np
from safetensors.numpy import save_file

from pipelines import checks


def _manifest(tmp_path, **changes) -> dict:
    weights = tmp_path / "ema.safetensors"
    save_file({"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}, str(weights))
    data = tmp_path / "data.json"
    data.write_text("{}")
    base = {"counts": {"images": 22, "per_shard": [11, 11], "skipped": {}},
            "stats": {"texture": {"mean": [0.1, -0.2], "std": [1.0, 0.9]}, "source": "builtin"},
            "metrics": {"fid": 12.5, "final_loss": 0.3},
            "artifacts": {"ema": str(weights), "shards": [str(data), str(data)]}}
    return {**base, **changes}


def _results(asset: str, manifest: dict, expected: dict | None = None) -> dict[str, tuple[bool, str]]:
    return {r.check_name: (r.passed, r.metadata["detail"].value)
            for r in checks.evaluate(asset, manifest, expected or {})}


def test_sound_manifest_passes_every_check(tmp_path):
    results = _results("sfd_model", _manifest(tmp_path), {"images": 22})
    assert set(results) == {spec.name for spec in checks.check_specs("sfd_model")}
    assert all(passed for passed, _ in results.values()), results
    assert set(_results("fid_report", _manifest(tmp_path))) >= {"fid_finite"}


def test_broken_manifests_fail_the_right_check(tmp_path):
    nan_stats = _manifest(tmp_path, stats={"texture": {"mean": [0.0, math.nan]}, "std": "inf"})
    assert _results("texture_latents", nan_stats)["stats_finite"] == \
        (False, "non-finite: ['stats.texture.mean[1]', 'stats.std']")
    assert _results("imagenet_shards", _manifest(tmp_path), {"images": 44})["expected_counts"] == \
        (False, "images=22, expected 44")
    assert not _results("imagenet_shards", _manifest(tmp_path, counts={"images": 0}))["expected_counts"][0]
    out_of_range = _manifest(tmp_path, stats={"latent_mean": 2e5, "latent_std": 0.0})
    passed, detail = _results("semantic_latents", out_of_range)["stats_in_range"]
    assert not passed and "latent_mean=200000" in detail and "latent_std=0" in detail
    missing = _manifest(tmp_path, artifacts={"shards": [str(tmp_path / "gone.tar")]})
    assert _results("imagenet_shards", missing)["artifacts_exist"][0] is False
    assert _results("fid_report", _manifest(tmp_path, metrics={"fid": math.inf}))["fid_finite"][0] is False


def test_truncated_weights_are_caught_from_the_header(tmp_path):
    manifest = _manifest(tmp_path)
    assert checks.safetensors_problem(manifest["artifacts"]["ema"]) is None
    path = tmp_path / "ema.safetensors"
    path.write_bytes(path.read_bytes()[:-4])  # the last tensor lost its tail
    passed, detail = _results("sfd_model", manifest)["weights_readable"]
    assert not passed and "truncated or padded" in detail
