"""Named channel layouts: SFD and the baselines it is compared with (SPEC §4.1, §8.4, §11).

A layout fixes what the latent holds and how the two streams are timed; the size (B/1 ... 1p0B/1) is chosen
separately, so ``build_model("LightningDiT-XL/1", **layout("redi_pca8"))`` is the XL/1 ReDi-PCA baseline.
Channels are always [texture | semantic]; every layout here uses the SD-VAE f16d32 texture latent (32 ch).

| name          | in ch | semantic | delta_t | REPA | what                                                        |
|---------------|-------|----------|---------|------|-------------------------------------------------------------|
| lightningdit  | 32    | 0        | 0       | no   | plain LightningDiT on the texture latent (one t embedder)   |
| repa          | 32    | 0        | 0       | yes  | LightningDiT + REPA                                         |
| redi_pca8     | 40    | 8        | 0       | yes  | ReDi-style merged tokens [tex 32 | DINOv2 PCA 8], synchronous |
| redi_pca8_sf  | 40    | 8        | 0.3     | yes  | the same PCA latent, semantic-first (SPEC §8.4 Table 5)     |
| sfd_sync      | 48    | 16       | 0       | yes  | [tex 32 | SemVAE 16], synchronous (SPEC §8.4 Table 3)       |
| sfd           | 48    | 16       | 0.3     | yes  | SFD (the released models)                                   |

``layout(name)`` gives the LightningDiT constructor arguments; ``LAYOUTS[name]`` also carries ``delta_t`` and
``loss_overrides()`` for ``sfd_core.transport.LossConfig``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TEXTURE_CHANNELS = 32  # SD-VAE f16d32


@dataclass(frozen=True)
class ChannelLayout:
    name: str
    texture_channels: int
    semantic_channels: int
    delta_t: float
    use_repa: bool
    description: str

    @property
    def in_channels(self) -> int:
        return self.texture_channels + self.semantic_channels

    def model_overrides(self) -> dict[str, Any]:
        """LightningDiT constructor arguments (``semantic_channels = 0`` builds the single-timestep model)."""
        return dict(in_channels=self.in_channels, semantic_channels=self.semantic_channels, use_repa=self.use_repa)

    def loss_overrides(self) -> dict[str, Any]:
        """``LossConfig`` fields this layout fixes (no REPA term for layouts without a projector)."""
        overrides: dict[str, Any] = dict(delta_t=self.delta_t, semantic_channels=self.semantic_channels)
        if not self.use_repa:
            overrides["repa_weight"] = 0.0
        return overrides


LAYOUTS: dict[str, ChannelLayout] = {lay.name: lay for lay in (
    ChannelLayout("lightningdit", TEXTURE_CHANNELS, 0, 0.0, False, "plain LightningDiT, texture latent only"),
    ChannelLayout("repa", TEXTURE_CHANNELS, 0, 0.0, True, "LightningDiT + REPA, texture latent only"),
    ChannelLayout("redi_pca8", TEXTURE_CHANNELS, 8, 0.0, True,
                  "ReDi-style merged [texture 32 | DINOv2 PCA 8], synchronous"),
    ChannelLayout("redi_pca8_sf", TEXTURE_CHANNELS, 8, 0.3, True, "[texture 32 | DINOv2 PCA 8], semantic-first"),
    ChannelLayout("sfd_sync", TEXTURE_CHANNELS, 16, 0.0, True, "[texture 32 | SemVAE 16], synchronous"),
    ChannelLayout("sfd", TEXTURE_CHANNELS, 16, 0.3, True, "SFD: [texture 32 | SemVAE 16], semantic first"),
)}


def get_layout(name: str) -> ChannelLayout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown channel layout {name!r}; valid names: {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def layout(name: str) -> dict[str, Any]:
    """Model overrides of a named layout: ``build_model(size, **layout(name))``."""
    return get_layout(name).model_overrides()
