"""Three-phase semantic-first sampler (SPEC §6).

The state is the composite latent [B, C, H, W] = [texture | semantic], integrated in global time
tau: 0 -> 1 + delta_t. At tau the streams sit at ``t_sem = min(tau, 1)`` and ``t_tex = max(tau - delta_t, 0)``;
the texture drift is active iff ``tau >= delta_t`` and the semantic drift iff ``tau <= 1``, giving the phases
[0, delta_t) semantic only, [delta_t, 1] both, (1, 1 + delta_t] texture only.

Methods: ``euler`` (the official fixed-grid Euler, N grid points = N - 1 updates, drift at each step's left
point), ``heun`` (explicit trapezoid on the same grid; both stages of a step use the phase of the step's
interior, so it stays second order when the phase boundaries are grid points) and ``dopri5`` (adaptive,
torchdiffeq, the official default; the grid only fixes the end time, so only the two end points are passed;
``dopri5_per_phase`` restarts it at each phase boundary).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch import nn

from sfd_core.models.guidance import guided_velocity
from sfd_core.transport import effective_delta_t, stream_times

METHODS = ("euler", "heun", "dopri5")
# Grid points within this distance of a phase boundary are put exactly on it (linspace rounding).
_BOUNDARY_SNAP = 1e-9

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(num_steps: int, delta_t: float, timestep_shift: float = 0.0) -> torch.Tensor:
    """Global time grid ``linspace(0, 1 + delta_t, num_steps)`` in float64, optionally shifted (SPEC §6:
    g -> g / (1 + dt) -> s g / (1 + (s - 1) g) -> g (1 + dt), for s > 0)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (grid points incl. both ends), got {num_steps}")
    end = 1.0 + delta_t
    grid = torch.linspace(0.0, end, num_steps, dtype=torch.float64)
    if timestep_shift > 0:
        g = grid / end
        grid = timestep_shift * g / (1.0 + (timestep_shift - 1.0) * g) * end
    for boundary in (delta_t, 1.0):
        grid[(grid - boundary).abs() < _BOUNDARY_SNAP] = boundary
    return grid


def phase_masks(tau: float, delta_t: float) -> tuple[bool, bool]:
    """(texture active, semantic active) at global time ``tau``: ``tau >= delta_t`` and ``tau <= 1``."""
    return tau >= delta_t, tau <= 1.0


class SemanticFirstDrift:
    """The masked drift ``f(tau, x)`` of the three-phase ODE; counts its evaluations in ``nfe``."""

    def __init__(self, velocity: VelocityFn, delta_t: float, semantic_channels: int):
        self.velocity, self.delta_t, self.semantic_channels = velocity, delta_t, semantic_channels
        self.nfe = 0

    def __call__(self, tau: float, x: torch.Tensor, masks: tuple[bool, bool] | None = None) -> torch.Tensor:
        texture_on, semantic_on = phase_masks(tau, self.delta_t) if masks is None else masks
        if not (texture_on or semantic_on):  # only possible for delta_t > 1: nothing moves
            return torch.zeros_like(x)
        t_tex, t_sem = stream_times(torch.tensor(tau, dtype=torch.float64), self.delta_t)
        batch = x.shape[0]
        self.nfe += 1
        v = self.velocity(x, t_tex.to(x).expand(batch), t_sem.to(x).expand(batch))
        n_tex = x.shape[1] - self.semantic_channels
        mask = torch.zeros(1, x.shape[1], 1, 1, dtype=x.dtype, device=x.device)
        mask[:, :n_tex] = float(texture_on)
        mask[:, n_tex:] = float(semantic_on)
        return v * mask


def _euler(drift: SemanticFirstDrift, x: torch.Tensor, grid: list[float]) -> torch.Tensor:
    for start, end in zip(grid[:-1], grid[1:]):
        x = x + (end - start) * drift(start, x)
    return x


def _heun(drift: SemanticFirstDrift, x: torch.Tensor, grid: list[float]) -> torch.Tensor:
    for start, end in zip(grid[:-1], grid[1:]):
        # One-sided limits: a stream switches on/off at a boundary, not within the step that ends there.
        masks = phase_masks(0.5 * (start + end), drift.delta_t)
        h = end - start
        k1 = drift(start, x, masks)
        k2 = drift(end, x + h * k1, masks)
        x = x + 0.5 * h * (k1 + k2)
    return x


def _dopri5(drift: SemanticFirstDrift, x: torch.Tensor, start: float, end: float, atol: float,
            rtol: float, masks: tuple[bool, bool] | None = None, land_on_end: bool = False) -> torch.Tensor:
    from torchdiffeq import odeint

    # Adaptive steps do not depend on the output times, so the end points give the official final state.
    # torchdiffeq steps past ``end`` and interpolates back; ``land_on_end`` makes the last step stop at ``end``.
    times = torch.tensor([start, end], dtype=x.dtype, device=x.device)
    options = dict(step_t=times[1:]) if land_on_end else None
    return odeint(lambda t, y: drift(float(t), y, masks), x, times, method="dopri5", atol=atol, rtol=rtol,
                  options=options)[-1]


def phase_intervals(delta_t: float) -> list[tuple[float, float]]:
    """The pieces of [0, 1 + delta_t] between the phase boundaries (delta_t and 1), empty ones dropped."""
    points = sorted({0.0, delta_t, 1.0, 1.0 + delta_t})
    return [(a, b) for a, b in zip(points[:-1], points[1:]) if b > a]


def _dopri5_per_phase(drift: SemanticFirstDrift, x: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """dopri5 restarted at every phase boundary, each phase with its own (constant) masks and its last step
    landing on the boundary, so every evaluation lies inside the phase: no step straddles a mask jump or the
    clamp of a stream time, and the adaptive error control sees a smooth right-hand side."""
    for start, end in phase_intervals(drift.delta_t):
        x = _dopri5(drift, x, start, end, atol, rtol, phase_masks(0.5 * (start + end), drift.delta_t),
                    land_on_end=True)
    return x


@contextmanager
def _eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Eval mode for the duration (no label dropout, no REPA output), restoring each model's mode after."""
    # Per submodule, so a model whose parts were in mixed modes gets exactly those modes back.
    modes = [(sub, sub.training) for m in models if isinstance(m, nn.Module) for sub in m.modules()]
    for sub, _ in modes:
        sub.training = False
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def _velocity_fn(model, labels: torch.Tensor, semantic_channels: int, cfg_scale: float,
                 cfg_interval_start: float, guidance_model, scale_tex: float, scale_sem: float,
                 autocast_dtype: torch.dtype | None) -> VelocityFn:
    """The (possibly guided) model velocity as ``f(x, t_tex, t_sem)``, returned in the state's dtype."""

    def autocast(x: torch.Tensor):
        if autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=autocast_dtype)

    def plain(x, t_tex, t_sem):
        with autocast(x):
            return model(x, (t_tex, t_sem), labels).to(x.dtype)

    def classifier_free(x, t_tex, t_sem):
        with autocast(x):
            return model.forward_with_cfg(x, (t_tex, t_sem), labels, cfg_scale, cfg_interval_start).to(x.dtype)

    def autoguided(x, t_tex, t_sem):
        with autocast(x):
            v_good = model(x, (t_tex, t_sem), labels).to(x.dtype)
            v_bad = guidance_model(x, (t_tex, t_sem), labels).to(x.dtype)
        return guided_velocity(v_good, v_bad, scale_tex, scale_sem, semantic_channels)

    if guidance_model is not None:
        return plain if scale_tex == 1.0 and scale_sem == 1.0 else autoguided
    return plain if cfg_scale == 1.0 else classifier_free


def sample(model, noise: torch.Tensor, labels: torch.Tensor, *, num_steps: int, method: str = "euler",
           delta_t: float, semantic_channels: int, cfg_scale: float = 1.0, cfg_interval_start: float = 0.0,
           guidance_model=None, guidance_scale_sem: float | None = None, guidance_scale_tex: float | None = None,
           timestep_shift: float = 0.0, atol: float = 1e-6, rtol: float = 1e-3, dopri5_per_phase: bool = False,
           return_nfe: bool = False, autocast_dtype: torch.dtype | None = None):
    """Integrate noise [B, C, H, W] from global time 0 to 1 + delta_t; returns the final composite latent
    (and the number of drift evaluations when ``return_nfe``).

    Guidance: none when ``cfg_scale == 1`` and no ``guidance_model``; CFG through ``model.forward_with_cfg``
    (all channels, interval start per stream); AutoGuidance ``v_bad + s (v_good - v_bad)`` when a weak
    ``guidance_model`` is given, with ``s`` = ``guidance_scale_tex`` / ``guidance_scale_sem`` per channel group
    (each defaults to ``cfg_scale``). Models are put in eval mode for the call and restored afterwards.

    ``dopri5`` integrates 0 -> 1 + delta_t in one adaptive run like the official sampler (the mask jumps at
    delta_t and 1 are seen only through step rejection). ``dopri5_per_phase=True`` (opt-in, not official)
    restarts the solver at each phase boundary instead, so no step crosses a discontinuity.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if dopri5_per_phase and method != "dopri5":
        raise ValueError(f"dopri5_per_phase applies to method 'dopri5' only, got {method!r}")
    if guidance_model is None and (guidance_scale_sem is not None or guidance_scale_tex is not None):
        raise ValueError("separate semantic/texture scales are AutoGuidance settings and need a guidance_model; "
                         "CFG uses cfg_scale on all channels")
    if not 0 <= semantic_channels <= noise.shape[1]:
        raise ValueError(f"semantic_channels {semantic_channels} must lie in [0, {noise.shape[1]}]")
    delta_t = effective_delta_t(delta_t, semantic_channels)
    scale_tex = cfg_scale if guidance_scale_tex is None else guidance_scale_tex
    scale_sem = cfg_scale if guidance_scale_sem is None else guidance_scale_sem
    velocity = _velocity_fn(model, labels, semantic_channels, cfg_scale, cfg_interval_start, guidance_model,
                            scale_tex, scale_sem, autocast_dtype)
    drift = SemanticFirstDrift(velocity, delta_t, semantic_channels)
    grid = time_grid(num_steps, delta_t, timestep_shift).tolist()

    with torch.no_grad(), _eval_mode(model, guidance_model):
        if method == "euler":
            x = _euler(drift, noise, grid)
        elif method == "heun":
            x = _heun(drift, noise, grid)
        elif dopri5_per_phase:
            x = _dopri5_per_phase(drift, noise, atol, rtol)
        else:
            x = _dopri5(drift, noise, grid[0], grid[-1], atol, rtol)
    return (x, drift.nfe) if return_nfe else x


def labels_for_indices(indices: torch.Tensor, num_classes: int, per_class: int = 50, seed: int = 0) -> torch.Tensor:
    """Class label of each global sample index (SPEC §6 balanced sampling): index ``i < per_class *
    num_classes`` gets ``i // per_class``; later indices get a random label that depends only on
    ``(seed, i)``, so every rank and batch split agrees."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    total = per_class * num_classes
    labels = torch.div(indices, per_class, rounding_mode="floor")
    extra = indices >= total
    if extra.any():
        offsets = indices[extra] - total
        generator = torch.Generator().manual_seed(seed)
        draws = torch.randint(num_classes, (int(offsets.max()) + 1,), generator=generator)
        labels[extra] = draws[offsets]
    return labels


def balanced_labels(n: int, num_classes: int, per_class: int = 50, seed: int = 0) -> torch.Tensor:
    """Labels of global indices 0..n-1: [0]*per_class + [1]*per_class + ..., random beyond that."""
    return labels_for_indices(torch.arange(n), num_classes, per_class, seed)


def decode_texture(latent: torch.Tensor, texture_channels: int, mean: torch.Tensor, std: torch.Tensor,
                   latent_multiplier: float = 1.0) -> torch.Tensor:
    """Texture channels of a normalised composite latent back to VAE latent space:
    ``z * std / latent_multiplier + mean`` (texture stats only; semantic channels are discarded)."""
    z = latent[:, :texture_channels]
    mean = torch.as_tensor(mean, dtype=z.dtype, device=z.device).reshape(1, texture_channels, 1, 1)
    std = torch.as_tensor(std, dtype=z.dtype, device=z.device).reshape(1, texture_channels, 1, 1)
    return z * std / latent_multiplier + mean
