"""Fixtures of the Dagster-layer tests: a fake profile whose stages all run ``fake_stage`` (no torch)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fake_stage import LOG_ENV

HERE = Path(__file__).resolve().parent


def fake_profile_data() -> dict:
    from pipelines.stages import STAGES

    stages = {name: {"value": float(i + 1)} for i, name in enumerate(STAGES)}
    stages["imagenet_shards"]["source"] = "builtin:tiny"
    stages["sfd_samples"]["grid"] = True
    for trained in ("semvae", "sfd_model", "autoguidance_model"):
        stages[trained]["safetensors"] = True
    stages["sfd_model"]["device"] = "${compute.device}"
    return {"description": "fake stages for the Dagster-layer tests", "compute": {"device": "cpu"},
            "pretrained": {"source": "files"}, "stages": stages,
            "expect": {"imagenet_shards": {"items": 3}}}


@dataclass
class FakeSetup:
    root: Path
    run_log: Path
    profile: Path

    def runs(self) -> list[str]:
        """Output dirs of every real (not cached) stage run so far."""
        return self.run_log.read_text().split() if self.run_log.exists() else []

    def write_profile(self, data: dict) -> None:
        self.profile.write_text(yaml.safe_dump(data))


@pytest.fixture
def fake_setup(tmp_path, monkeypatch) -> FakeSetup:
    """Env for the fake stages: import path for the stage subprocesses, a run log, a storage root, a profile."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p))
    setup = FakeSetup(root=tmp_path / "artifacts", run_log=tmp_path / "runs.log", profile=tmp_path / "fake.yaml")
    setup.write_profile(fake_profile_data())
    monkeypatch.setenv(LOG_ENV, str(setup.run_log))
    monkeypatch.setenv("SFD_STORAGE_ROOT", str(setup.root))
    monkeypatch.setenv("SFD_PROFILE", str(setup.profile))
    monkeypatch.setenv("SFD_LOCK_DIR", str(tmp_path / "locks"))
    return setup


def fake_assets() -> list:
    """The real stage assets, each running ``fake_stage`` instead of its sfd_core program."""
    from pipelines.assets.factory import imagenet_source, stage_asset
    from pipelines.stages import STAGES

    return [imagenet_source, *(stage_asset(dataclasses.replace(spec, module="fake_stage"))
                               for spec in STAGES.values())]


def fake_checkpoint_assets() -> list:
    """The per-checkpoint evaluation assets, running ``fake_stage``."""
    from pipelines.assets.checkpoint_eval import checkpoint_eval_assets
    from pipelines.stages import STAGES

    return checkpoint_eval_assets(dataclasses.replace(STAGES["sfd_samples"], module="fake_stage"),
                                  dataclasses.replace(STAGES["fid_report"], module="fake_stage"))
