"""SFD training objective: asynchronous flow matching with a semantic-first time offset (SPEC §5).

Flow time t in [0, 1], t = 0 is noise, t = 1 is data: ``x_t = t * x1 + (1 - t) * x0``, velocity ``u = x1 - x0``.
Channels are [texture | semantic]; the semantic stream runs ``delta_t`` ahead of the texture stream:
``tau = t * (1 + delta_t)``, ``t_sem = min(tau, 1)``, ``t_tex = max(tau - delta_t, 0)``.

``semantic_channels = 0`` is plain flow matching: with no semantic stream to lead, ``delta_t`` is ignored, so
the ReDi-style / LightningDiT baselines use the same code path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REPA_TYPES = ("cos", "mse", "cos_mse")


def effective_delta_t(delta_t: float, semantic_channels: int) -> float:
    """The semantic lead actually applied: 0 when there are no semantic channels (plain flow matching)."""
    if delta_t < 0:
        raise ValueError(f"delta_t must be >= 0, got {delta_t}")
    return float(delta_t) if semantic_channels > 0 else 0.0


def randn(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draws; with a generator they are drawn on the generator's device and then moved, so one
    CPU generator makes a run reproducible whatever device the tensors live on."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def sample_time(batch: int, generator: torch.Generator | None = None, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logit-normal flow times ``sigmoid(N(0, 1))`` in (0, 1), shape [batch].

    The official code draws the normal with scipy from numpy's global RNG (and never seeds it); we use torch with
    an optional generator so a run is reproducible. The distribution is the same.
    """
    return torch.sigmoid(randn((batch,), generator, device, dtype))


def global_time(t: torch.Tensor, delta_t: float) -> torch.Tensor:
    """Flow time in (0, 1) -> global time ``tau = t * (1 + delta_t)`` in (0, 1 + delta_t)."""
    return t * (1.0 + delta_t)


def stream_times(tau: torch.Tensor, delta_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Global time -> per-stream flow times ``(t_tex, t_sem)``, each clamped to [0, 1]."""
    t_sem = tau.clamp(max=1.0)
    t_tex = (tau - delta_t).clamp(min=0.0)
    return t_tex, t_sem


def async_times(t: torch.Tensor, delta_t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tau, t_tex, t_sem)`` for flow times ``t``; ``delta_t = 0`` gives ``t_tex == t_sem == t`` exactly."""
    tau = global_time(t, delta_t)
    t_tex, t_sem = stream_times(tau, delta_t)
    return tau, t_tex, t_sem


def channel_times(t_tex: torch.Tensor, t_sem: torch.Tensor, num_channels: int,
                  semantic_channels: int) -> torch.Tensor:
    """Per-channel times [B, C, 1, 1]: ``t_tex`` on the texture channels, ``t_sem`` on the semantic ones."""
    if not 0 <= semantic_channels <= num_channels:
        raise ValueError(f"semantic_channels {semantic_channels} must lie in [0, {num_channels}]")
    batch = t_tex.shape[0]
    tex = t_tex.view(batch, 1).expand(batch, num_channels - semantic_channels)
    sem = t_sem.view(batch, 1).expand(batch, semantic_channels)
    return torch.cat([tex, sem], dim=1).view(batch, num_channels, 1, 1)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t_tex: torch.Tensor, t_sem: torch.Tensor,
                semantic_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear path per stream: ``(x_t, u)`` with ``x_t = t * x1 + (1 - t) * x0`` and ``u = x1 - x0`` on all
    channels (the target is kept for clamped streams too: texture at t_tex = 0, semantic at t_sem = 1)."""
    t = channel_times(t_tex, t_sem, x1.shape[1], semantic_channels).to(x1.dtype)
    return t * x1 + (1.0 - t) * x0, x1 - x0


@dataclass(frozen=True)
class LossConfig:
    """SFD loss (SPEC §5.2). Main-run defaults: REPA lambda 1.0 cosine; the 80-ep recipe uses 0.5 ``cos_mse``."""

    delta_t: float = 0.3
    semantic_channels: int = 16
    semantic_weight: float = 2.0
    use_cosine_loss: bool = True
    repa_weight: float = 1.0
    repa_type: str = "cos"

    def __post_init__(self) -> None:
        if self.repa_type not in REPA_TYPES:
            raise ValueError(f"repa_type must be one of {REPA_TYPES}, got {self.repa_type!r}")
        if self.semantic_channels < 0:
            raise ValueError(f"semantic_channels must be >= 0, got {self.semantic_channels}")
        effective_delta_t(self.delta_t, self.semantic_channels)  # validates the sign


def weighted_mse(velocity: torch.Tensor, target: torch.Tensor, semantic_channels: int,
                 semantic_weight: float) -> torch.Tensor:
    """Per-sample ``mean_{c,h,w}(w_c * (v - u)^2)``, w = 1 on texture and ``semantic_weight`` on semantic
    channels; the divisor is all C*H*W elements. Shape [B]."""
    channels = velocity.shape[1]
    weights = torch.ones(channels, dtype=velocity.dtype, device=velocity.device)
    weights[channels - semantic_channels:] = semantic_weight
    return ((velocity - target) ** 2 * weights.view(1, channels, 1, 1)).mean(dim=(1, 2, 3))


def velocity_cosine_loss(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean_{h,w}(1 - cos(v, u))`` with the cosine taken over channels (LightningDiT). Shape [B]."""
    return (1.0 - F.cosine_similarity(velocity, target, dim=1)).mean(dim=(1, 2))


def repa_loss(projection: torch.Tensor, features: torch.Tensor, repa_type: str) -> torch.Tensor:
    """Per-sample REPA alignment between the model's projection [B, N, D] and encoder features [B, D, h, w]
    (rearranged ``b c h w -> b (h w) c``), before the weight lambda. Shape [B]."""
    target = features.flatten(2).transpose(1, 2)
    if target.shape != projection.shape:
        raise ValueError(f"REPA projection {tuple(projection.shape)} does not match features "
                         f"{tuple(features.shape)} rearranged to {tuple(target.shape)}")
    cos = (1.0 - F.cosine_similarity(target, projection, dim=-1)).mean(dim=1)
    if repa_type == "cos":
        return cos
    mse = ((target - projection) ** 2).mean(dim=(1, 2))
    if repa_type == "mse":
        return mse
    return (cos + mse) / 2.0


def sfd_training_loss(model, x1: torch.Tensor, y: torch.Tensor, dino_feats: torch.Tensor | None = None,
                      cfg: LossConfig = LossConfig(), generator: torch.Generator | None = None
                      ) -> dict[str, torch.Tensor]:
    """One SFD training objective on a batch of normalised composite latents ``x1`` [B, C, H, W].

    Draws (in this order, from ``generator`` when given) the flow times [B], then the noise [B, C, H, W];
    calls ``model(x_t, (t_tex, t_sem), y)``, which returns the velocity or ``(velocity, projection)``.
    Returns scalar tensors (batch means): ``loss = mse + cos + repa`` with lambda already in ``repa``.
    Label dropout belongs to the model (it drops labels in training mode).
    """
    delta_t = effective_delta_t(cfg.delta_t, cfg.semantic_channels)
    t = sample_time(x1.shape[0], generator, x1.device, x1.dtype)
    _, t_tex, t_sem = async_times(t, delta_t)
    x0 = randn(tuple(x1.shape), generator, x1.device, x1.dtype)
    x_t, target = interpolate(x0, x1, t_tex, t_sem, cfg.semantic_channels)

    output = model(x_t, (t_tex, t_sem), y)
    velocity, projection = output if isinstance(output, tuple) else (output, None)
    # Losses in at least float32 even when the forward ran under bf16 autocast.
    loss_dtype = torch.promote_types(x1.dtype, torch.float32)
    velocity, target = velocity.to(loss_dtype), target.to(loss_dtype)

    mse = weighted_mse(velocity, target, cfg.semantic_channels, cfg.semantic_weight).mean()
    zero = torch.zeros((), dtype=loss_dtype, device=x1.device)
    cos = velocity_cosine_loss(velocity, target).mean() if cfg.use_cosine_loss else zero
    repa = zero
    if dino_feats is not None and cfg.repa_weight > 0:
        if projection is None:
            raise ValueError("dino_feats were given but the model returned no REPA projection "
                             "(it must be in training mode and built with use_repa=True)")
        repa = cfg.repa_weight * repa_loss(projection.to(loss_dtype), dino_feats.to(loss_dtype),
                                           cfg.repa_type).mean()
    return {"loss": mse + cos + repa, "mse": mse, "cos": cos, "repa": repa}
