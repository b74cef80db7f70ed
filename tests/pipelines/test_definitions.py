"""The one ``defs``: loads without torch, validates through the dagster CLI, has the asset graph of
ARCHITECTURE.md, GPU stages in the "gpu" pool, and an instance config that works from a fresh home."""
import os
import subprocess
import sys

import dagster as dg

from pipelines.definitions import defs
from pipelines.home import INSTANCE_CONFIG, ensure_dagster_home
from pipelines.stages import STAGES

GPU_STAGES = set(STAGES) - {"imagenet_shards"}


def test_definitions_validate_with_the_dagster_cli(tmp_path):
    home = ensure_dagster_home(tmp_path / "home")   # the CLI needs an existing DAGSTER_HOME
    done = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-m",
                           "pipelines.definitions"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DAGSTER_HOME": str(home)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation successful" in done.stdout + done.stderr


def test_definitions_import_without_torch():
    code = ("import sys, pipelines.definitions as d; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "print(len(d.defs.resolve_all_asset_keys()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) == len(STAGES) + 3  # + imagenet_source, checkpoint_samples, checkpoint_fid


def test_asset_graph_groups_pools_and_checks():
    graph = defs.resolve_asset_graph()
    key = dg.AssetKey
    assert graph.get(key("sfd_model")).parent_keys == {key("texture_latents"), key("semantic_latents"),
                                                       key("dinov2_features")}
    assert graph.get(key("imagenet_shards")).parent_keys == {key("imagenet_source")}
    assert graph.get(key("fid_report")).parent_keys == {key("sfd_samples"), key("fid_reference")}
    assert graph.get(key("imagenet_source")).is_external
    for stage, spec in STAGES.items():
        assets_def = defs.get_assets_def(stage)
        assert assets_def.group_names_by_key[key(stage)] == spec.group
        assert assets_def.code_versions_by_key[key(stage)] == spec.code_version
        assert (assets_def.op.pool == "gpu") == (stage in GPU_STAGES)
        assert {c.name for c in assets_def.check_specs} >= {"stats_finite", "expected_counts", "stats_in_range",
                                                            "artifacts_exist"}
    assert "fid_finite" in {c.name for c in defs.get_assets_def("fid_report").check_specs}
    for name in ("sfd_pipeline", "checkpoint_eval", "preflight"):
        assert defs.resolve_job_def(name) is not None
    assert defs.resolve_job_def("checkpoint_eval").partitions_def.name == "sfd_checkpoints"
    assert defs.resolve_schedule_def("nightly_checkpoint_eval").cron_schedule == "0 2 * * *"
    assert defs.resolve_sensor_def("new_checkpoint_sensor").job_name == "checkpoint_eval"


def test_fresh_dagster_home_gets_the_instance_config(tmp_path):
    home = ensure_dagster_home(tmp_path / "home")
    assert (home / "dagster.yaml").read_text() == INSTANCE_CONFIG.read_text()
    instance = dg.DagsterInstance.from_config(str(home))
    assert not instance.telemetry_enabled
    assert instance.run_monitoring_enabled and instance.run_retries_enabled
    assert instance.run_retries_max_retries == 1
    config = instance.get_concurrency_config()
    assert config.pool_config.default_pool_limit == 1
    assert {"key": "sfd/gpu", "value": "exclusive", "limit": 1} in config.run_queue_config.tag_concurrency_limits
