"""The new-checkpoint sensor and the nightly schedule: each committed checkpoint of the current training run is
requested once, as a "sfd_checkpoints" partition, and its evaluation is recorded under that partition."""
import datetime

import dagster as dg

from conftest import fake_assets, fake_checkpoint_assets
from pipelines.automation import new_checkpoint_sensor, nightly_checkpoint_eval
from pipelines.checkpoints import PARTITIONS_NAME
from pipelines.definitions import make_resources
from pipelines.io_manager import manifest_store_url
from pipelines.jobs import checkpoint_eval_job
from pipelines.stages import STAGES, upstream_assets
from storage import fs
from storage.fingerprint import fingerprint

MODEL_INFO = {"model": {"name": "LightningDiT-tiny/1", "overrides": {"input_size": 2, "in_channels": 12}},
              "delta_t": 0.3, "latent_multiplier": 1.0}


def _fake_upstream(root: str) -> dict[str, str]:
    """Finished fake stages (manifest + IO-manager copy) for everything the evaluation reads."""
    fingerprints = {}
    for i, name in enumerate(["texture_latents", "semantic_latents", "dinov2_features", "autoguidance_model",
                              "fid_reference"]):
        fp = f"{i:016x}"
        manifest = {"stage": name, "fingerprint": fp, "uri": fs.join(root, name, fp), "stats": {"total": 1.0},
                    "counts": {"items": 1}}
        fs.write_json(fs.join(manifest["uri"], "_SUCCESS.json"), manifest)
        fs.write_json(manifest_store_url(root, name), manifest)
        fingerprints[name] = fp
    return fingerprints


def _commit_checkpoint(model_dir: str, step: int, complete: bool = True) -> str:
    url = fs.join(model_dir, "checkpoints", f"step_{step:07d}")
    fs.write_bytes(fs.join(url, "ema.safetensors"), b"weights")
    if complete:
        fs.write_json(fs.join(url, "_COMPLETE.json"),
                      {"step": step, "files": ["ema.safetensors", "model.safetensors", "state.pt"], **MODEL_INFO})
    return url


def _sensor(instance, cursor=None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=make_resources()) as context:
        return new_checkpoint_sensor(context)


def test_sensor_and_schedule_request_each_new_checkpoint_once(fake_setup):
    root = str(fake_setup.root)
    with dg.instance_for_test() as instance:
        assert not _sensor(instance).run_requests  # nothing built yet

        upstream = _fake_upstream(root)
        # the model's fingerprint under the current (fake) profile: its values and its upstream fingerprints
        values = {"value": 7.0, "device": "cpu", "safetensors": True}  # the fake profile's sfd_model
        model_fp = fingerprint("sfd_model", STAGES["sfd_model"].code_version, values,
                               {name: upstream[name] for name in upstream_assets("sfd_model")})
        model_dir = fs.join(root, "sfd_model", model_fp)
        first = _commit_checkpoint(model_dir, 10)
        _commit_checkpoint(model_dir, 20, complete=False)  # being written: not a checkpoint yet

        result = _sensor(instance)
        key = f"{model_fp}-step_0000010"
        [request] = result.run_requests
        assert (request.run_key, request.partition_key, result.cursor) == (key, key, key)
        assert result.dynamic_partitions_requests[0].partition_keys == [key]
        again = _sensor(instance, cursor=key)
        assert not again.run_requests and again.cursor == key

        # evaluate it (fake stages) the way the launched run would
        instance.add_dynamic_partitions(PARTITIONS_NAME, [key])
        defs = dg.Definitions(assets=fake_assets() + fake_checkpoint_assets(), jobs=[checkpoint_eval_job],
                              resources=make_resources())
        run = defs.resolve_job_def("checkpoint_eval").execute_in_process(instance=instance, partition_key=key)
        assert run.success
        samples = fs.read_json(manifest_store_url(root, "checkpoint_samples", key))
        assert samples["config"]["checkpoint"] == fs.join(first, "ema.safetensors")
        assert samples["config"]["model_name"] == "LightningDiT-tiny/1" and samples["config"]["model_url"] == ""
        assert samples["config"]["model_overrides"] == MODEL_INFO["model"]["overrides"]
        report = fs.read_json(manifest_store_url(root, "checkpoint_fid", key))
        assert report["upstream"]["samples_url"] == samples["fingerprint"]

        tick = datetime.datetime(2026, 11, 23, 2, 0, tzinfo=datetime.timezone.utc)
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=tick,
                                       resources=make_resources()) as context:
            assert isinstance(nightly_checkpoint_eval(context), dg.SkipReason)  # step 10 was evaluated
            _commit_checkpoint(model_dir, 20)
            request = nightly_checkpoint_eval(context)
        assert request.partition_key == f"{model_fp}-step_0000020"
        assert instance.has_dynamic_partition(PARTITIONS_NAME, request.partition_key)
