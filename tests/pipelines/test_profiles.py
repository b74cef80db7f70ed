"""Profiles: built-ins are complete and match the stage programs' Config fields; user files extend them; wrong
values fail before any work with a message naming the field and the fix."""
from __future__ import annotations

import dataclasses
import importlib

import dagster as dg
import pytest
import yaml

from conftest import fake_assets, fake_profile_data
from pipelines.definitions import make_resources
from pipelines.pretrained import STANDIN_NETWORKS, resolve_pretrained
from pipelines.profiles import (BUILTIN_PROFILES, KNOWN_MODELS, check_storage_root, load_profile, substitute,
                                validate_profile)
from pipelines.stages import STAGES
from sfd_core.config import ConfigError, from_dict


def _write(tmp_path, data: dict, name: str = "user.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("name", BUILTIN_PROFILES)
def test_builtin_profiles_are_valid_configs_of_the_stage_programs(name):
    """Every stage's values (placeholders and upstream URIs filled) build the program's Config dataclass."""
    profile = load_profile(name)
    assert set(profile.stages) == set(STAGES)
    weights = resolve_pretrained(profile.pretrained)
    namespaces = {"compute": {"device": "cpu", "nproc_per_node": 1, "precision": "fp32", **profile.compute},
                  "pretrained": weights.identity}
    for stage, spec in STAGES.items():
        values = substitute(profile.stage_values(stage), namespaces)
        config_cls = importlib.import_module(spec.module).Config
        fields = {f.name for f in dataclasses.fields(config_cls)}
        assert "out_url" in fields and set(spec.inputs) <= fields, (stage, spec.inputs)
        from_dict(config_cls, {**values, **{k: "dir" for k in spec.inputs}, "out_url": "out"})


def test_tiny_profile_validates(tmp_path):
    validate_profile(load_profile("tiny"), str(tmp_path / "root"))
    assert (tmp_path / "root").is_dir()


def test_known_models_and_standins_match_sfd_core():
    from sfd_core.models import MODEL_CONFIGS
    from sfd_core.standins import standin_specs

    assert set(KNOWN_MODELS) == set(MODEL_CONFIGS)
    assert set(STANDIN_NETWORKS) == set(standin_specs("x", 32))


def test_user_file_extends_a_builtin_and_overrides_deeply(tmp_path, monkeypatch):
    path = _write(tmp_path, {"extends": "tiny", "stages": {"sfd_model": {"max_steps": 5}},
                             "vars": {"seed": 7}})
    monkeypatch.setenv("SFD_PROFILE", path)
    profile = load_profile()
    tiny = load_profile("tiny")
    assert profile.name == "user" and profile.origin == path
    assert profile.stage_values("sfd_model")["max_steps"] == 5
    assert profile.stage_values("sfd_model")["global_batch"] == tiny.stage_values("sfd_model")["global_batch"]
    assert profile.stage_values("sfd_samples")["seed"] == 7 and tiny.stage_values("sfd_samples")["seed"] == 0


def test_placeholders_keep_types_and_reject_unknown_names():
    spaces = {"vars": {"n": 3, "spec": {"path": "/w"}}}
    assert substitute({"a": "${vars.n}", "b": "x${vars.n}y", "c": ["${vars.spec}"]}, spaces) == \
        {"a": 3, "b": "x3y", "c": [{"path": "/w"}]}
    with pytest.raises(ConfigError, match=r"no vars entry named 'm'"):
        substitute("${vars.m}", spaces)


@pytest.mark.parametrize("stage, values, field, fix", [
    ("sfd_model", {"model": "LightningDiT-Q/1"}, "stages.sfd_model.model", "LightningDiT-XL/1"),
    ("autoguidance_model", {"delta_t": 1.0}, "stages.autoguidance_model.delta_t", "outside [0, 1)"),
    ("sfd_model", {"delta_t": -0.1}, "stages.sfd_model.delta_t", "outside [0, 1)"),
    ("imagenet_shards", {"source": "/no/such/imagenet"}, "stages.imagenet_shards.source", "does not exist"),
])
def test_wrong_values_name_the_field_and_the_fix(tmp_path, stage, values, field, fix):
    path = _write(tmp_path, {"extends": "tiny", "stages": {stage: values}})
    with pytest.raises(ConfigError) as error:
        validate_profile(load_profile(path), str(tmp_path / "root"))
    assert field in str(error.value) and fix in str(error.value) and path in str(error.value)


def test_malformed_profiles_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['sfd_modle'\]"):
        load_profile(_write(tmp_path, {"extends": "tiny", "stages": {"sfd_modle": {}}}))
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['stage'\]"):
        load_profile(_write(tmp_path, {"stage": {}}))
    with pytest.raises(ConfigError, match="no such file"):
        load_profile(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"no config for stage\(s\) \['autoguidance_model'"):
        validate_profile(load_profile(_write(tmp_path, {"stages": {"sfd_model": {}}})))


def test_missing_pretrained_file_names_the_network(tmp_path):
    weights = resolve_pretrained({"source": "files", "inception": str(tmp_path / "nope.pth")})
    with pytest.raises(ConfigError, match=r"pretrained.inception: weights not found"):
        weights.identity
    present = tmp_path / "inc.pth"
    present.write_bytes(b"1234")
    weights = resolve_pretrained({"source": "files", "texture_vae": {"kind": "ldm_f16d32", "path": "x"}},
                                 weights={"texture_vae": str(present)})
    # fingerprints see the file's name and size, not where this machine keeps it
    assert weights.identity["texture_vae"] == {"kind": "ldm_f16d32", "path": "inc.pth:4"}
    assert weights.paths()["texture_vae"]["path"] == str(present)


def test_unreadable_bucket_fails_naming_storage_root(moto_s3, monkeypatch):
    moto_s3.apply_env(monkeypatch)
    check_storage_root(moto_s3.url("prefix"))  # the fixture's bucket exists
    with pytest.raises(ConfigError, match=r"storage.root: cannot read bucket of 's3://no-such-bucket/sfd'"):
        check_storage_root("s3://no-such-bucket/sfd")


def test_wrong_profile_fails_the_run_before_any_stage_runs(fake_setup):
    data = fake_profile_data()
    data["stages"]["sfd_model"]["model"] = "LightningDiT-Q/1"
    fake_setup.write_profile(data)
    with dg.instance_for_test() as instance:
        result = dg.materialize(fake_assets(), selection=["imagenet_shards"], resources=make_resources(),
                                instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.to_string()
    assert "stages.sfd_model.model: unknown model size 'LightningDiT-Q/1'" in message
    assert fake_setup.runs() == []
