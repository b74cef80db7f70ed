"""pipes_entry through a real PipesSubprocessClient: one materialization with the manifest's metadata, log lines
and metrics forwarded live, under torchrun only rank 0 reports, and the plain stage program outside Dagster."""

import base64
import io
import json
import os
import subprocess
import sys

import dagster as dg
from PIL import Image

from pipelines.resources import ComputeResource
from storage.manifest import read_success

FINGERPRINT = "0123456789abcdef"


def _stage_asset(config: dict, env: dict[str, str] | None = None, settings: dict | None = None):
    @dg.asset(name="fake")
    def fake(context: dg.AssetExecutionContext, compute: ComputeResource):
        command = compute.command("fake_stage", json.dumps(config), distributed=True,
                                  settings=settings or {"device": "cpu"})
        invocation = compute.client().run(context=context, command=command, env=env)
        return invocation.get_materialize_result()

    return fake


def test_launch_commands():
    compute = ComputeResource()
    entry = ["-m", "pipelines.pipes_entry", "sfd_core.x", "--config", "{}"]
    assert compute.command("sfd_core.x", "{}", distributed=True, settings={"device": "cpu"}) == \
        [sys.executable, *entry]
    assert compute.command("sfd_core.x", "{}", distributed=True, settings={"device": "cuda", "nproc_per_node": 0}) \
        == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=gpu", *entry]
    assert compute.command("sfd_core.x", "{}", distributed=False, settings={"device": "cuda", "nproc_per_node": 8}) \
        == [sys.executable, *entry]  # a CPU stage (sharding) never goes through torchrun


def test_torchrun_two_ranks_only_rank_zero_reports(fake_setup, tmp_path):
    out_url = str(tmp_path / "fake" / FINGERPRINT)
    # device "cuda" only selects the torchrun launcher here; the fake stage itself never touches a GPU
    asset = _stage_asset({"out_url": out_url}, env={"CUDA_VISIBLE_DEVICES": ""},
                         settings={"device": "cuda", "nproc_per_node": 2})
    result, messages = _run(asset)
    assert result.success
    assert sorted(fake_setup.runs()) == [out_url, out_url + "#rank1"]
    [materialization] = result.asset_materializations_for_node("fake")
    assert materialization.metadata["fingerprint"].value == FINGERPRINT
    assert sum(f"fake stage: writing {out_url}" in m for m in messages) == 1


def _run(asset) -> tuple[dg.ExecuteInProcessResult, list[str]]:
    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], resources={"compute": ComputeResource()}, instance=instance,
                                raise_on_error=False)
        messages = [record.user_message for record in instance.all_logs(result.run_id)]
    return result, messages


def test_rank_zero_reports_metadata_logs_and_metrics(fake_setup, tmp_path):
    out_url = str(tmp_path / "fake" / FINGERPRINT)
    result, messages = _run(_stage_asset({"out_url": out_url, "grid": True, "standins": True}))
    assert result.success
    [materialization] = result.asset_materializations_for_node("fake")
    meta = materialization.metadata
    assert materialization.tags["dagster/data_version"] == FINGERPRINT
    assert meta["fingerprint"].value == FINGERPRINT and meta["uri"].value == out_url
    assert meta["counts/items"].value == 3 and meta["metrics/fid"].value == 1.0
    assert meta["last/img_per_s"].value == 123.0 and meta["last/step"].value == 7  # from the reported metric
    assert "last/loss" not in meta  # already in the manifest's metrics
    assert meta["config"].value["out_url"] == out_url and meta["standins"].value is True
    assert "Stand-in (random-init) networks" in meta["metrics_table"].value
    thumbnail = meta["sample_grid"].value.split("base64,")[1].split(")")[0]
    assert Image.open(io.BytesIO(base64.b64decode(thumbnail))).size == (384, 192)  # 600x300 grid, shrunk
    assert any(f"fake stage: writing {out_url}" in m for m in messages)
    assert any("step 7: img_per_s=123, loss=0.25" in m for m in messages)
    assert read_success(out_url)["fingerprint"] == FINGERPRINT


def test_stage_failure_fails_the_step_and_records_the_stage_error(fake_setup, tmp_path):
    asset = _stage_asset({"out_url": str(tmp_path / "x" / FINGERPRINT), "fail": True})
    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], resources={"compute": ComputeResource()}, instance=instance,
                                raise_on_error=False)
        closed = [record.dagster_event for record in instance.all_logs(result.run_id)
                  if record.dagster_event is not None
                  and "closed with exception" in (record.dagster_event.message or "")]
    assert not result.success
    assert "failed with code 1" in next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE"
                                        ).event_specific_data.error.to_string()
    [event] = closed
    assert "RuntimeError: fake stage asked to fail" in event.event_specific_data.error.to_string()


def test_outside_dagster_it_is_the_plain_stage_program(fake_setup, tmp_path):
    out_url = str(tmp_path / "fake" / FINGERPRINT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    done = subprocess.run([sys.executable, "-m", "pipelines.pipes_entry", "fake_stage", "--config",
                           json.dumps({"out_url": out_url}), "--set", "items=5"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "SFD_METRIC" in done.stdout and "dagster" not in done.stderr.lower()
    assert read_success(out_url)["counts"]["items"] == 5
