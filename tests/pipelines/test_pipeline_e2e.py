"""The real tiny pipeline (builtin photos, stand-in networks, CPU): the whole graph twice with
``dagster.materialize`` (the second run is all cached), the CLI on the same root, a training run killed with
SIGKILL and resumed from its checkpoint, and a rerun on an S3 root (SeaweedFS)."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from pipelines.definitions import all_assets, make_resources
from pipelines.io_manager import manifest_store_url
from pipelines.resources import PROJECT_ROOT
from pipelines.stages import STAGES
from storage import fs

pytestmark = pytest.mark.slow
WHOLE_GRAPH = dg.AssetSelection.assets("fid_report").upstream()
CLI_TIMEOUT_S = 480


def _materialize(selection=WHOLE_GRAPH, **kw) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        return dg.materialize(all_assets, selection=selection, resources=make_resources(**kw), instance=instance)


def _outputs(root: Path) -> dict[str, dict[str, float]]:
    """{stage: {fingerprint dir: mtime of its _SUCCESS.json (0 while unfinished)}}: what exists on disk."""
    found = {}
    for stage in STAGES:
        stage_dir = root / stage
        found[stage] = {d.name: (d / "_SUCCESS.json").stat().st_mtime if (d / "_SUCCESS.json").exists() else 0.0
                        for d in stage_dir.iterdir()} if stage_dir.exists() else {}
    return found


def _meta(result: dg.ExecuteInProcessResult, node: str) -> dict:
    return result.asset_materializations_for_node(node)[0].metadata


@pytest.fixture(scope="module")
def standins_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("standins")


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory, standins_dir):
    """Environment of this module's runs: the tiny profile, a fresh root, a module-wide stand-in cache."""
    root = tmp_path_factory.mktemp("tiny") / "artifacts"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFD_PROFILE", "tiny")
        mp.setenv("SFD_STORAGE_ROOT", str(root))
        mp.setenv("SFD_STANDINS_DIR", str(standins_dir))
        mp.setenv("SFD_LOCK_DIR", str(root.parent / "locks"))
        yield root


@pytest.fixture(scope="module")
def tiny_first_run(tiny_env):
    """The whole tiny graph, built once for this module."""
    return _materialize()


def test_whole_tiny_graph_twice_second_run_is_all_cached(tiny_env, tiny_first_run):
    first = tiny_first_run
    assert first.success
    assert not any(_meta(first, stage)["cached"].value for stage in STAGES)
    assert all(check.passed for check in first.get_asset_check_evaluations())
    built = _outputs(tiny_env)
    assert all(len(dirs) == 1 and all(dirs.values()) for dirs in built.values()), built

    second = _materialize()
    assert second.success
    assert all(_meta(second, stage)["cached"].value for stage in STAGES)
    for stage in STAGES:
        assert (second.asset_materializations_for_node(stage)[0].tags["dagster/data_version"]
                == first.asset_materializations_for_node(stage)[0].tags["dagster/data_version"])
    assert _outputs(tiny_env) == built  # nothing new written, nothing rewritten

    report = fs.read_json(manifest_store_url(str(tiny_env), "fid_report"))
    assert report["standins"] is True and math.isfinite(report["metrics"]["fid"])
    assert report["counts"]["samples"] == 11
    for node in ("sfd_samples", "fid_report"):
        assert "data:image/png;base64," in _meta(first, node)["sample_grid"].value
    model = _meta(first, "sfd_model")
    assert math.isfinite(model["metrics/final_loss"].value) and model["metrics/img_per_s"].value > 0
    assert "| fid |" in _meta(first, "fid_report")["metrics_table"].value


def _cli(args: list[str], home: Path, log: Path) -> subprocess.Popen:
    """``python -m pipelines.demo`` in its own session (so a test can kill its whole process tree)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipelines.demo", *args], cwd=str(PROJECT_ROOT),
                                env={**os.environ, "DAGSTER_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _finish(process: subprocess.Popen, log: Path) -> str:
    try:
        process.wait(timeout=CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    output = log.read_text()
    assert process.returncode == 0, output[-4000:]
    return output


def test_cli_on_a_built_root_reruns_nothing_and_prints_the_report(tiny_env, tiny_first_run, tmp_path):
    assert tiny_first_run.success
    built = _outputs(tiny_env)
    output = _finish(_cli([], tmp_path / "home", tmp_path / "cli.log"), tmp_path / "cli.log")
    report = fs.read_json(manifest_store_url(str(tiny_env), "fid_report"))
    assert "FID report (stand-in networks" in output
    assert f"report: {report['artifacts']['report']}" in output and Path(report["artifacts"]["report"]).exists()
    assert _outputs(tiny_env) == built
    instance = dg.DagsterInstance.from_config(str(tmp_path / "home"))  # the CLI used the persistent home
    [run] = instance.get_runs()
    assert run.status == dg.DagsterRunStatus.SUCCESS


def test_training_killed_mid_stage_resumes_from_its_checkpoint(tiny_env, tiny_first_run, tmp_path):
    """SIGKILL the CLI's whole process tree once the first checkpoint is committed; the rerun resumes from it
    (the checkpoint is not rewritten), finishes, and leaves one output dir with each checkpoint once."""
    assert tiny_first_run.success
    profile = tmp_path / "longer.yaml"
    profile.write_text(yaml.safe_dump({"extends": "tiny",
                                       "stages": {"sfd_model": {"max_steps": 30, "keep_last": 3}}}))
    args, home = ["--profile", str(profile), "--select", 'key:"sfd_model"'], tmp_path / "home"
    before = _outputs(tiny_env)
    process = _cli(args, home, tmp_path / "killed.log")
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while True:
        new = set(_outputs(tiny_env)["sfd_model"]) - set(before["sfd_model"])
        first_checkpoint = tiny_env / "sfd_model" / next(iter(new), "-") / "checkpoints" / "step_0000010"
        if (first_checkpoint / "_COMPLETE.json").exists():
            break
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    model_dir = first_checkpoint.parent.parent
    assert not (model_dir / "_SUCCESS.json").exists()
    committed = (first_checkpoint / "_COMPLETE.json").stat().st_mtime

    output = _finish(_cli(args, home, tmp_path / "resumed.log"), tmp_path / "resumed.log")
    assert "was killed earlier: marked failed, its GPU pool slot freed" in output  # else it waits for the slot
    assert "train_sfd: resumed from " in output
    after = _outputs(tiny_env)
    assert set(after["sfd_model"]) == set(before["sfd_model"]) | {model_dir.name}
    assert {stage: dirs for stage, dirs in after.items() if stage != "sfd_model"} == \
        {stage: dirs for stage, dirs in before.items() if stage != "sfd_model"}  # upstream untouched
    assert fs.read_json(str(model_dir / "_SUCCESS.json"))["counts"]["steps"] == 30
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["step_0000010", "step_0000020", "step_0000030"]
    assert (first_checkpoint / "_COMPLETE.json").stat().st_mtime == committed  # resumed, not retrained


def test_sensor_evaluates_the_newest_real_checkpoint_once(tiny_env, tiny_first_run):
    """The new-checkpoint sensor on the built tiny root: it requests the newest committed sfd_model checkpoint as
    a dynamic partition; sampling and FID of that partition run from the checkpoint's own weights and info."""
    from pipelines.automation import new_checkpoint_sensor
    from pipelines.checkpoints import PARTITIONS_NAME

    assert tiny_first_run.success
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources=make_resources()) as context:
            result = new_checkpoint_sensor(context)
        [request] = result.run_requests
        model_dir = Path(_meta(tiny_first_run, "sfd_model")["uri"].value)   # the tiny profile's own run
        newest = sorted(os.listdir(model_dir / "checkpoints"))[-1]
        assert newest in request.partition_key and result.cursor == request.partition_key
        instance.add_dynamic_partitions(PARTITIONS_NAME, [request.partition_key])
        evaluation = dg.materialize(all_assets, selection=["checkpoint_samples", "checkpoint_fid"],
                                    partition_key=request.partition_key, resources=make_resources(),
                                    instance=instance)
        assert evaluation.success
        fid = evaluation.asset_materializations_for_node("checkpoint_fid")[0]
        assert fid.partition == request.partition_key and math.isfinite(fid.metadata["metrics/fid"].value)
        with dg.build_sensor_context(instance=instance, cursor=result.cursor, resources=make_resources()) as again:
            assert not new_checkpoint_sensor(again).run_requests   # each checkpoint is evaluated once


@pytest.mark.s3
def test_whole_graph_on_a_fresh_s3_root_then_rerun_is_cached(seaweed_s3, monkeypatch, standins_dir):
    seaweed_s3.apply_env(monkeypatch)
    fs.clear_filesystem_cache()
    root = seaweed_s3.fresh_url("sfd")
    monkeypatch.setenv("SFD_PROFILE", "tiny")
    monkeypatch.setenv("SFD_STANDINS_DIR", str(standins_dir))
    monkeypatch.setenv("SFD_LOCK_DIR", str(standins_dir.parent / "s3-locks"))
    first = _materialize(storage_root=root)    # a fresh bucket prefix: every stage computes into the bucket
    second = _materialize(storage_root=root)   # same fingerprints: every stage is cached
    assert first.success and second.success
    assert not any(_meta(first, stage)["cached"].value for stage in STAGES)
    assert all(_meta(second, stage)["cached"].value for stage in STAGES)
    assert math.isfinite(fs.read_json(manifest_store_url(root, "fid_report"))["metrics"]["fid"])
    manifest = fs.read_json(manifest_store_url(root, "texture_latents"))
    assert manifest["uri"].startswith(root + "/texture_latents/") and manifest["counts"]["images"] == 22
    keys = [o["Key"] for o in seaweed_s3.client().list_objects_v2(
        Bucket=seaweed_s3.bucket, Prefix=root.split("/", 3)[3])["Contents"]]
    assert any(k.endswith("texture_latents/" + manifest["fingerprint"] + "/_SUCCESS.json") for k in keys)
    assert all(check.passed for check in first.get_asset_check_evaluations())
