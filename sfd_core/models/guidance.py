"""Guidance combinations shared by CFG (cond vs. null label) and AutoGuidance (strong vs. weak model)."""
from __future__ import annotations

import torch


def _per_sample(value: float | torch.Tensor, ref: torch.Tensor) -> torch.Tensor | float:
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        return value.to(ref.dtype).view(-1, 1, 1, 1)
    return value


def guided_velocity(v_good: torch.Tensor, v_bad: torch.Tensor, scale_tex: float | torch.Tensor,
                    scale_sem: float | torch.Tensor | None = None, semantic_channels: int = 0,
                    guide_tex: torch.Tensor | None = None, guide_sem: torch.Tensor | None = None) -> torch.Tensor:
    """``v_bad + s * (v_good - v_bad)`` on [B, C, H, W] velocities, channels ordered [texture | semantic].

    ``scale_tex`` applies to the first ``C - semantic_channels`` channels, ``scale_sem`` (default: ``scale_tex``)
    to the last ``semantic_channels``. Scales may be floats or [B] tensors. Optional [B] bool masks
    ``guide_tex`` / ``guide_sem`` switch guidance off per sample (the output is then exactly ``v_good``).
    CFG: v_good = conditional, v_bad = unconditional. AutoGuidance: v_good = main model, v_bad = weak model.
    """
    scale_sem = scale_tex if scale_sem is None else scale_sem
    n_tex = v_good.shape[1] - semantic_channels
    parts = []
    for sl, scale, active in ((slice(0, n_tex), scale_tex, guide_tex),
                              (slice(n_tex, None), scale_sem, guide_sem)):
        good, bad = v_good[:, sl], v_bad[:, sl]
        if good.shape[1] == 0:
            continue
        mixed = bad + _per_sample(scale, good) * (good - bad)
        if active is not None:
            mixed = torch.where(active.view(-1, 1, 1, 1), mixed, good)
        parts.append(mixed)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@torch.no_grad()
def autoguidance_velocity(good_model, bad_model, x: torch.Tensor, t, y: torch.Tensor,
                          scale_tex: float, scale_sem: float | None = None) -> torch.Tensor:
    """AutoGuidance: both models conditional on the same labels and times, combined by ``guided_velocity``."""
    v_good = good_model(x, t, y)
    v_bad = bad_model(x, t, y)
    return guided_velocity(v_good, v_bad, scale_tex, scale_sem, getattr(good_model, "semantic_channels", 0))
