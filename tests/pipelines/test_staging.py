"""The caching mechanism with fake stages: cached reruns run nothing, config changes rerun exactly the
affected stages, and a selection without its upstream fails naming it."""
from __future__ import annotations

import os

import dagster as dg

from conftest import fake_assets, fake_profile_data
from pipelines.checks import check_specs
from pipelines.definitions import make_resources
from pipelines.io_manager import manifest_store_url
from pipelines.locks import exclusive_output
from pipelines.stages import STAGES
from storage import fs
from storage.fingerprint import fingerprint


def _materializations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetMaterialization]:
    return {node: result.asset_materializations_for_node(node)[0] for node in STAGES}


def test_second_materialize_is_cached_and_runs_nothing(fake_setup):
    with dg.instance_for_test() as instance:
        first = dg.materialize(fake_assets(), resources=make_resources(), instance=instance)
        assert first.success
        runs = fake_setup.runs()
        assert len(runs) == len(STAGES) and len(set(runs)) == len(STAGES)
        done = _materializations(first)
        assert not any(m.metadata["cached"].value for m in done.values())

        second = dg.materialize(fake_assets(), resources=make_resources(), instance=instance)
        assert second.success
        assert fake_setup.runs() == runs  # nothing ran again
        again = _materializations(second)
        assert all(m.metadata["cached"].value for m in again.values())
        for node, mat in again.items():
            assert mat.tags["dagster/data_version"] == done[node].tags["dagster/data_version"]
            assert mat.metadata["fingerprint"].value == done[node].metadata["fingerprint"].value

    # Manifests chain: fid_report = sum of every value upstream of it (each stage adds its own value once per
    # path), and its fingerprint is the hash of its config and its upstream fingerprints.
    report = fs.read_json(manifest_store_url(str(fake_setup.root), "fid_report"))
    reference = fs.read_json(manifest_store_url(str(fake_setup.root), "fid_reference"))
    samples = fs.read_json(manifest_store_url(str(fake_setup.root), "sfd_samples"))
    assert report["stats"]["total"] == samples["stats"]["total"] + reference["stats"]["total"] + 10.0
    expected_fp = fingerprint("fid_report", STAGES["fid_report"].code_version, {"value": 10.0},
                              {"sfd_samples": samples["fingerprint"], "fid_reference": reference["fingerprint"]})
    assert report["fingerprint"] == expected_fp
    assert report["uri"] == fs.join(str(fake_setup.root), "fid_report", expected_fp)

    checks = second.get_asset_check_evaluations()
    assert len(checks) == sum(len(check_specs(stage)) for stage in STAGES) and all(c.passed for c in checks)


def test_config_change_reruns_only_that_stage_and_its_downstream(fake_setup):
    selection = ["imagenet_shards", "fid_reference", "texture_latents"]
    with dg.instance_for_test() as instance:
        assert dg.materialize(fake_assets(), selection=selection, resources=make_resources(),
                              instance=instance).success
        before = fake_setup.runs()
        data = fake_profile_data()
        data["stages"]["imagenet_shards"]["value"] = 100.0
        data["stages"]["texture_latents"]["value"] = 3.0  # the same value as before: still cached
        fake_setup.write_profile(data)
        changed = dg.materialize(fake_assets(), selection=selection, resources=make_resources(), instance=instance)
        assert changed.success
        new_runs = fake_setup.runs()[len(before):]
        assert sorted(run.split("/")[-2] for run in new_runs) == sorted(selection)  # upstream changed: all rerun
        data["stages"]["fid_reference"]["value"] = 7.5
        fake_setup.write_profile(data)
        assert dg.materialize(fake_assets(), selection=selection, resources=make_resources(),
                              instance=instance).success
        assert [run.split("/")[-2] for run in fake_setup.runs()[len(before) + 3:]] == ["fid_reference"]


def test_selection_without_upstream_names_the_missing_asset(fake_setup):
    with dg.instance_for_test() as instance:
        result = dg.materialize(fake_assets(), selection=["semvae"], resources=make_resources(),
                                instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.to_string()
    assert "upstream asset 'dinov2_features' of 'semvae'" in message and "never materialized" in message
    assert fake_setup.runs() == []


def test_an_output_still_being_written_by_a_live_process_fails_fast_naming_it(fake_setup):
    """E.g. a stage left running by a killed orchestrator: a rerun must not become a second writer."""
    values = {"value": 1.0, "source": "builtin:tiny"}  # imagenet_shards in the fake profile
    out_url = fs.join(str(fake_setup.root), "imagenet_shards",
                      fingerprint("imagenet_shards", STAGES["imagenet_shards"].code_version, values, {}))
    with exclusive_output(out_url), dg.instance_for_test() as instance:
        result = dg.materialize(fake_assets(), selection=["imagenet_shards"], resources=make_resources(),
                                instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert f"{out_url} is being written by pid {os.getpid()}" in failure.event_specific_data.error.to_string()
    assert fake_setup.runs() == []
