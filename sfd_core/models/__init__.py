"""SFD networks: LightningDiT configs and a builder.

``build_model("LightningDiT-XL/1")`` gives the SFD XL/1 network (48 input channels, 16 of them semantic, 16x16
latents, REPA projector after block 2). Keyword overrides change any constructor argument; the named channel
layouts of the baselines (``sfd_core.models.layouts``) are overrides too:
``build_model("LightningDiT-XL/1", **layout("lightningdit"))`` is plain LightningDiT-XL/1 on the 32-channel
texture latent, ``layout("repa")``, ``layout("redi_pca8")`` and ``layout("sfd")`` (the default) the others.
"""
from __future__ import annotations

import inspect

from torch import nn

from sfd_core.models.guidance import autoguidance_velocity, guided_velocity
from sfd_core.models.layouts import LAYOUTS, ChannelLayout, get_layout, layout
from sfd_core.models.lightningdit import LightningDiT

# SFD defaults shared by every config (SPEC 4.1): 16x16x48 latents = texture 32 + semantic 16.
_SFD_DEFAULTS = dict(input_size=16, patch_size=1, in_channels=48, semantic_channels=16, mlp_ratio=4.0,
                     class_dropout_prob=0.1, num_classes=1000, use_repa=True, repa_depth=2,
                     repa_projector_dim=2048, repa_out_dim=768)

MODEL_CONFIGS: dict[str, dict] = {
    "LightningDiT-B/1": dict(_SFD_DEFAULTS, depth=12, hidden_size=768, num_heads=12),
    "LightningDiT-L/1": dict(_SFD_DEFAULTS, depth=24, hidden_size=1024, num_heads=16),
    "LightningDiT-XL/1": dict(_SFD_DEFAULTS, depth=28, hidden_size=1152, num_heads=16),
    "LightningDiT-1p0B/1": dict(_SFD_DEFAULTS, depth=24, hidden_size=1536, num_heads=24),
    # CPU-test scale; the REPA projector is narrowed too so tiny models stay tiny.
    "LightningDiT-tiny/1": dict(_SFD_DEFAULTS, depth=2, hidden_size=64, num_heads=2, repa_projector_dim=128),
}

_CONSTRUCTOR_ARGS = set(inspect.signature(LightningDiT.__init__).parameters) - {"self"}


def model_config(name: str, **overrides) -> dict:
    """The resolved constructor arguments of a named config with overrides applied."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {sorted(MODEL_CONFIGS)}")
    unknown = sorted(set(overrides) - _CONSTRUCTOR_ARGS)
    if unknown:
        raise ValueError(f"unknown LightningDiT argument(s) {unknown}; valid: {sorted(_CONSTRUCTOR_ARGS)}")
    return dict(MODEL_CONFIGS[name], **overrides)


def build_model(name: str, **overrides) -> nn.Module:
    """Build a named LightningDiT config (see ``MODEL_CONFIGS``). Build under ``torch.device("meta")`` to
    inspect shapes without allocating."""
    return LightningDiT(**model_config(name, **overrides))


__all__ = ["LAYOUTS", "MODEL_CONFIGS", "ChannelLayout", "LightningDiT", "autoguidance_velocity", "build_model",
           "get_layout", "guided_velocity", "layout", "model_config"]
