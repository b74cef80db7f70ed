"""Session fixtures of the eval tests: stand-in networks and two tiny SFD models in fake sfd_model stages."""
from __future__ import annotations

import pytest
from eval_helpers import RESOLUTION, fake_model_stage, tiny_model_weights

from sfd_core.standins import make_standins


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    return make_standins(tmp_path_factory.mktemp("standins"), seed=0, resolution=RESOLUTION)


@pytest.fixture(scope="session")
def model_stages(tmp_path_factory):
    """(main model stage dir, AutoGuidance model stage dir)."""
    d = tmp_path_factory.mktemp("models")
    main = fake_model_stage(d, tiny_model_weights(d / "main.safetensors", seed=1), "main0000")
    weak = fake_model_stage(d, tiny_model_weights(d / "weak.safetensors", seed=2), "weak0000")
    return main, weak
