"""torch-fidelity's TF-compatible InceptionV3 (``inception-v3-compat``) from a local weights file, offline.

torch-fidelity would download its weights when given no path; here the path is always resolved first (explicit
file, then the torch hub cache where torch-fidelity itself would have put it), so nothing is fetched silently.
torch_fidelity is imported lazily.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from sfd_core.encoders.weights import WeightsNotFoundError

FEATURE_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
# A few keys and shapes that identify the torch-fidelity InceptionV3 state dict.
_SIGNATURE = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048)}


def torch_hub_weights_path() -> Path:
    """Where torch-fidelity's own download would land: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def _check_weights_file(path: Path) -> None:
    try:  # mmap reads only the header and the tensors we look at
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict (got {type(state).__name__})")
    found = {k: tuple(state[k].shape) if k in state else None for k in _SIGNATURE}
    if found != _SIGNATURE:
        raise ValueError(f"{path} is not a torch-fidelity InceptionV3 state dict: expected {_SIGNATURE}, found {found}")


def resolve_inception_weights(path: str | os.PathLike | None = None,
                              config_field: str = "fid.inception_weights") -> str:
    """Path of verified Inception weights: ``path`` if given (must exist), else the torch hub cache copy."""
    candidate = Path(path).expanduser() if path is not None else torch_hub_weights_path()
    if not candidate.is_file():
        origin = f"{config_field} = {str(path)!r}" if path is not None else "no path set"
        raise WeightsNotFoundError(
            f"inception: {origin} and {candidate} does not exist. Expected {INCEPTION_WEIGHTS_FILENAME} "
            f"(torch-fidelity InceptionV3, from {INCEPTION_WEIGHTS_URL}). Copy it to {torch_hub_weights_path()} "
            f"or anywhere and set {config_field} to its path."
        )
    _check_weights_file(candidate)
    return str(candidate)


def fidelity_kwargs(weights_path: str) -> dict[str, Any]:
    """Extra kwargs for ``torch_fidelity.calculate_metrics`` so it uses this Inception and never downloads."""
    return {"feature_extractor": FEATURE_EXTRACTOR, "feature_extractor_weights_path": weights_path}


def build_inception(weights_path: str, features: Sequence[str] = ("2048",), internal_dtype: str | None = None):
    """torch-fidelity ``FeatureExtractorInceptionV3`` (uint8 NCHW in, tuple of features out), loaded strictly."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3(FEATURE_EXTRACTOR, list(features), feature_extractor_weights_path=weights_path,
                                       feature_extractor_internal_dtype=internal_dtype)


def random_inception_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A random-init InceptionV3 state dict in torch-fidelity's layout, deterministic in ``seed``.

    Convolutions are re-drawn with Kaiming-normal (DATA-NOTES §5): the default init collapses the features and
    every FID comes out near 0."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _FreshInception(FeatureExtractorInceptionV3):
        # The constructor insists on loading weights; an empty placeholder dict keeps the fresh initialisation.
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if state_dict:
                return super().load_state_dict(state_dict, strict=strict, assign=assign)
            return None

    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        placeholder = os.path.join(tmp, "empty.pth")
        torch.save({}, placeholder)
        torch.manual_seed(seed)
        model = _FreshInception(FEATURE_EXTRACTOR, ["2048"], feature_extractor_weights_path=placeholder)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
