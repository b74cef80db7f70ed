"""Three-phase sampler: grid, phase masks, convergence order on a linear ODE, guidance wiring, labels, decode."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

from sfd_core.models import build_model
from sfd_core.sampling import (SemanticFirstDrift, balanced_labels, decode_texture, labels_for_indices,
                               phase_intervals, phase_masks, sample, time_grid)

DTYPE = torch.float64


class LinearField(nn.Module):
    """Fake velocity model v = A x (channel mixing), time independent: x(T) = expm(A T) x(0) is exact.
    Records every call's (x, t_tex, t_sem)."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, y):
        t_tex, t_sem = t
        self.calls.append((x.clone(), t_tex.clone(), t_sem.clone()))
        return torch.einsum("oc,bchw->bohw", self.matrix, x)


def _block_field(tex: int, sem: int, seed: int = 0) -> LinearField:
    """Texture and semantic blocks evolve independently, so each has its own closed-form solution."""
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.zeros(tex + sem, tex + sem, dtype=DTYPE)
    matrix[:tex, :tex] = 0.8 * torch.randn(tex, tex, generator=gen, dtype=DTYPE)
    matrix[tex:, tex:] = 0.8 * torch.randn(sem, sem, generator=gen, dtype=DTYPE)
    return LinearField(matrix)


def _exact_block_solution(field: LinearField, noise: torch.Tensor, tex: int) -> torch.Tensor:
    # Each stream is active for a global-time interval of length 1 (texture [dt, 1+dt], semantic [0, 1]).
    expm = torch.linalg.matrix_exp(field.matrix)
    return torch.einsum("oc,bchw->bohw", expm, noise)


def _noise(shape, seed=1, dtype=DTYPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_time_grid_endpoints_shift_and_boundary_snapping():
    grid = time_grid(14, 0.3)
    assert len(grid) == 14 and grid[0] == 0.0 and grid[-1] == 1.3
    assert 0.3 in grid.tolist() and 1.0 in grid.tolist()  # linspace gives 0.30000000000000004: snapped
    assert torch.allclose(time_grid(50, 0.3, timestep_shift=1.0), time_grid(50, 0.3), atol=1e-15)
    shifted = time_grid(6, 0.3, timestep_shift=3.0).tolist()
    for i, value in enumerate(shifted):
        g = i / 5
        assert math.isclose(value, 3 * g / (1 + 2 * g) * 1.3, abs_tol=1e-14)
    with pytest.raises(ValueError):
        time_grid(1, 0.3)


def test_phase_masks_at_the_boundaries():
    dt = 0.3
    assert phase_masks(0.0, dt) == (False, True)
    assert phase_masks(math.nextafter(dt, 0), dt) == (False, True)
    assert phase_masks(dt, dt) == (True, True)  # texture starts at tau == dt
    assert phase_masks(1.0, dt) == (True, True)  # semantic still active at tau == 1
    assert phase_masks(math.nextafter(1.0, 2), dt) == (True, False)
    assert phase_masks(1.3, dt) == (True, False)


def test_drift_feeds_stream_times_and_masks_channels():
    field = _block_field(2, 2)
    drift = SemanticFirstDrift(lambda x, t_tex, t_sem: field(x, (t_tex, t_sem), None), 0.3, 2)
    x = _noise((2, 4, 1, 1))
    full = torch.einsum("oc,bchw->bohw", field.matrix, x)
    for tau, tex_on, sem_on in [(0.1, 0, 1), (0.3, 1, 1), (0.7, 1, 1), (1.0, 1, 1), (1.2, 1, 0)]:
        v = drift(tau, x)
        _, t_tex, t_sem = field.calls[-1]
        assert torch.allclose(t_tex, torch.full((2,), max(tau - 0.3, 0.0), dtype=DTYPE), atol=1e-15)
        assert torch.allclose(t_sem, torch.full((2,), min(tau, 1.0), dtype=DTYPE), atol=1e-15)
        assert torch.equal(v[:, :2], full[:, :2] * tex_on) and torch.equal(v[:, 2:], full[:, 2:] * sem_on)
    assert drift.nfe == 5


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_phases_freeze_texture_before_dt_and_semantic_after_one(method):
    dt, steps = 0.3, 12  # boundaries fall inside steps here
    field = _block_field(2, 2)
    noise = _noise((2, 4, 3, 3))
    out = sample(field, noise, torch.zeros(2, dtype=torch.long), num_steps=steps, method=method, delta_t=dt,
                 semantic_channels=2)
    grid = time_grid(steps, dt).tolist()
    states = [c[0] for c in field.calls][:: 1 if method == "euler" else 2]  # inputs at the grid points
    assert len(states) == steps - 1
    for tau, state in zip(grid, states):
        if tau <= dt:  # no texture update has happened yet (first active step starts at tau >= dt)
            assert torch.equal(state[:, :2], noise[:, :2])
    after_one = [s for tau, s in zip(grid, states) if tau > 1.0]
    assert after_one, "grid must have points after tau = 1"
    for state in after_one:
        assert torch.equal(state[:, 2:], out[:, 2:])
    assert not torch.equal(out[:, :2], noise[:, :2]) and not torch.equal(out[:, 2:], noise[:, 2:])


def test_euler_matches_torchdiffeq_euler_on_the_same_grid():
    field = _block_field(2, 2, seed=4)
    noise = _noise((2, 4, 2, 2))
    ours = sample(field, noise, None, num_steps=20, method="euler", delta_t=0.3, semantic_channels=2)
    drift = SemanticFirstDrift(lambda x, t_tex, t_sem: field(x, (t_tex, t_sem), None), 0.3, 2)
    reference = odeint(lambda t, y: drift(float(t), y), noise, time_grid(20, 0.3), method="euler")[-1]
    assert torch.allclose(ours, reference, rtol=0, atol=1e-14)


def _observed_order(errors: list[float]) -> float:
    return math.log2(errors[-2] / errors[-1])


@pytest.mark.parametrize("method,order", [("euler", 1.0), ("heun", 2.0)])
def test_convergence_order_on_a_linear_ode_with_phase_boundaries_on_the_grid(method, order):
    dt, tex, sem = 0.25, 2, 2
    field = _block_field(tex, sem, seed=2)
    noise = _noise((3, tex + sem, 1, 1))
    exact = _exact_block_solution(field, noise, tex)
    errors = []
    for updates in (10, 20, 40):  # h = 1.25 / updates puts 0.25 and 1.0 on the grid
        out = sample(field, noise, None, num_steps=updates + 1, method=method, delta_t=dt, semantic_channels=sem)
        errors.append((out - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert abs(_observed_order(errors) - order) < 0.15, errors


def test_dopri5_meets_tolerance_and_ignores_output_times():
    field = _block_field(3, 0, seed=5)
    noise = _noise((2, 3, 2, 2))
    exact = _exact_block_solution(field, noise, 3)
    scale = exact.abs().max().item()
    loose, nfe = sample(field, noise, None, num_steps=250, method="dopri5", delta_t=0.0, semantic_channels=0,
                        return_nfe=True)
    tight = sample(field, noise, None, num_steps=250, method="dopri5", delta_t=0.0, semantic_channels=0,
                   atol=1e-10, rtol=1e-9)
    loose_err, tight_err = (loose - exact).abs().max().item(), (tight - exact).abs().max().item()
    assert loose_err < 1e-2 * scale and tight_err < 1e-7 * scale and tight_err < loose_err
    assert 6 <= nfe < 200  # adaptive: far fewer evaluations than the 250-point grid
    drift = SemanticFirstDrift(lambda x, t_tex, t_sem: field(x, (t_tex, t_sem), None), 0.0, 0)
    full_grid = odeint(lambda t, y: drift(float(t), y), noise, time_grid(250, 0.0), method="dopri5",
                       atol=1e-6, rtol=1e-3)[-1]
    assert torch.allclose(loose, full_grid, rtol=0, atol=1e-12)


def test_dopri5_converges_through_the_phase_boundaries():
    # The mask jumps are seen only through step rejection (as in the official sampler): at the official
    # tolerances the error here is ~1e-1, so convergence is checked with tight tolerances.
    dt, tex, sem = 0.3, 2, 2
    field = _block_field(tex, sem, seed=6)
    noise = _noise((2, tex + sem, 1, 1))
    exact = _exact_block_solution(field, noise, tex)
    errors = [(sample(field, noise, None, num_steps=250, method="dopri5", delta_t=dt, semantic_channels=sem,
                      atol=atol, rtol=rtol) - exact).abs().max().item()
              for atol, rtol in ((1e-8, 1e-6), (1e-10, 1e-8))]
    assert errors[1] < 1e-6 < errors[0] < 1e-3


@pytest.mark.parametrize("dt", [0.0, 0.3, 1.0, 1.5])
def test_dopri5_per_phase_is_accurate_at_official_tolerances(dt):
    # Restarting at tau = dt and tau = 1 keeps every step inside one phase: at the official tolerances the
    # error drops from ~5e-2 (one run, jumps seen only through step rejection) to the tolerance level.
    tex, sem = 2, 2
    field = _block_field(tex, sem, seed=6)
    noise = _noise((2, tex + sem, 1, 1))
    exact = _exact_block_solution(field, noise, tex)
    scale = exact.abs().max().item()
    official = sample(field, noise, None, num_steps=250, method="dopri5", delta_t=dt, semantic_channels=sem)
    per_phase, nfe = sample(field, noise, None, num_steps=250, method="dopri5", delta_t=dt, semantic_channels=sem,
                            dopri5_per_phase=True, return_nfe=True)
    per_phase_err, official_err = (per_phase - exact).abs().max().item(), (official - exact).abs().max().item()
    assert per_phase_err < 1e-3 * scale < 1e-2 * scale < official_err
    assert nfe < 100
    tight = sample(field, noise, None, num_steps=250, method="dopri5", delta_t=dt, semantic_channels=sem,
                   dopri5_per_phase=True, atol=1e-10, rtol=1e-9)
    assert (tight - exact).abs().max().item() < 1e-7 * scale
    # Phase pieces in order; empty ones (dt = 0) are skipped.
    expected_pieces = {0.0: [(0.0, 1.0)], 0.3: [(0.0, 0.3), (0.3, 1.0), (1.0, 1.3)],
                       1.0: [(0.0, 1.0), (1.0, 2.0)], 1.5: [(0.0, 1.0), (1.0, 1.5), (1.5, 2.5)]}[dt]
    pieces = phase_intervals(dt)
    assert len(pieces) == len(expected_pieces)
    assert [x for piece in pieces for x in piece] == pytest.approx([x for piece in expected_pieces for x in piece])


class RecordingDrift(SemanticFirstDrift):
    def __init__(self, *args):
        super().__init__(*args)
        self.seen: list[tuple[float, tuple[bool, bool] | None]] = []

    def __call__(self, tau, x, masks=None):
        self.seen.append((tau, masks))
        return super().__call__(tau, x, masks)


def test_dopri5_per_phase_evaluates_only_inside_each_phase():
    from sfd_core.sampling import _dopri5, _dopri5_per_phase

    field = _block_field(2, 2, seed=7)
    noise = _noise((1, 4, 1, 1))
    drift = RecordingDrift(lambda x, t_tex, t_sem: field(x, (t_tex, t_sem), None), 0.3, 2)
    _dopri5_per_phase(drift, noise, atol=1e-6, rtol=1e-3)
    phase_of = {(False, True): (0.0, 0.3), (True, True): (0.3, 1.0), (True, False): (1.0, 1.3)}
    assert {masks for _, masks in drift.seen} == set(phase_of)
    for tau, masks in drift.seen:  # each phase's last step lands on its end: nothing outside the phase
        start, end = phase_of[masks]
        assert start - 1e-12 <= tau <= end + 1e-12, (tau, masks)
    # The official single run steps past 1 + dt and interpolates back (kept as the default behaviour).
    official = RecordingDrift(drift.velocity, 0.3, 2)
    _dopri5(official, noise, 0.0, 1.3, atol=1e-6, rtol=1e-3)
    assert max(tau for tau, _ in official.seen) > 1.3
    with pytest.raises(ValueError, match="dopri5_per_phase"):
        sample(field, noise, None, num_steps=10, method="heun", delta_t=0.3, semantic_channels=2,
               dopri5_per_phase=True)


def _tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("LightningDiT-tiny/1", input_size=4, in_channels=6, semantic_channels=2, num_classes=5,
                        repa_out_dim=8)
    with torch.no_grad():  # the official init zeros the output layers; perturb so velocities are non-trivial
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _manual_euler(velocity, noise, grid, dt, sem):
    x = noise
    for start, end in zip(grid[:-1], grid[1:]):
        t_tex, t_sem = torch.full((len(x),), max(start - dt, 0.0)), torch.full((len(x),), min(start, 1.0))
        v = velocity(x, (t_tex, t_sem))
        mask = torch.tensor([float(start >= dt)] * (x.shape[1] - sem) + [float(start <= 1.0)] * sem)
        x = x + (end - start) * v * mask.view(1, -1, 1, 1)
    return x


class CountingCFG(nn.Module):
    """Wraps a model and counts forward_with_cfg calls (a real model underneath, not a stub)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cfg_calls = inner, 0

    def forward(self, x, t, y):
        return self.inner(x, t, y)

    def forward_with_cfg(self, *args):
        self.cfg_calls += 1
        return self.inner.forward_with_cfg(*args)


def test_cfg_scale_one_is_unguided_and_cfg_scale_applies_guidance():
    model = _tiny_model(0)
    noise, labels = _noise((2, 6, 4, 4), dtype=torch.float32), torch.tensor([1, 3])
    counted = CountingCFG(model)
    plain = sample(model, noise, labels, num_steps=4, delta_t=0.3, semantic_channels=2)
    scale_one = sample(counted, noise, labels, num_steps=4, delta_t=0.3, semantic_channels=2, cfg_scale=1.0)
    assert torch.equal(plain, scale_one) and counted.cfg_calls == 0
    t = (torch.full((2,), 0.4), torch.full((2,), 0.7))
    with torch.no_grad():
        assert torch.allclose(model.forward_with_cfg(noise, t, labels, 1.0, 0.0), model(noise, t, labels), atol=1e-5)

    guided = sample(counted, noise, labels, num_steps=4, delta_t=0.3, semantic_channels=2, cfg_scale=3.0)
    assert counted.cfg_calls == 3
    null = torch.full_like(labels, 5)

    def cfg_velocity(x, t):
        v_c, v_u = model(x, t, labels), model(x, t, null)
        return v_u + 3.0 * (v_c - v_u)

    with torch.no_grad():
        reference = _manual_euler(cfg_velocity, noise, time_grid(4, 0.3).tolist(), 0.3, 2)
    assert torch.allclose(guided, reference, atol=1e-5) and not torch.allclose(guided, plain, atol=1e-3)


def test_autoguidance_with_identical_models_equals_the_plain_model():
    model = _tiny_model(1)
    noise, labels = _noise((2, 6, 4, 4), dtype=torch.float32), torch.tensor([0, 4])
    plain = sample(model, noise, labels, num_steps=5, delta_t=0.3, semantic_channels=2)
    guided = sample(model, noise, labels, num_steps=5, delta_t=0.3, semantic_channels=2, cfg_scale=1.7,
                    guidance_model=copy.deepcopy(model))
    assert torch.allclose(guided, plain, rtol=0, atol=1e-6)


def test_autoguidance_uses_separate_semantic_and_texture_scales():
    good, bad = _tiny_model(2), _tiny_model(3)
    noise, labels = _noise((2, 6, 4, 4), dtype=torch.float32), torch.tensor([2, 2])
    out = sample(good, noise, labels, num_steps=3, delta_t=0.3, semantic_channels=2, cfg_scale=1.5,
                 guidance_model=bad, guidance_scale_sem=2.0, guidance_scale_tex=1.25)
    scales = torch.tensor([1.25] * 4 + [2.0] * 2).view(1, -1, 1, 1)

    def ag_velocity(x, t):
        v_good, v_bad = good(x, t, labels), bad(x, t, labels)
        return v_bad + scales * (v_good - v_bad)

    with torch.no_grad():
        reference = _manual_euler(ag_velocity, noise, time_grid(3, 0.3).tolist(), 0.3, 2)
    assert torch.allclose(out, reference, atol=1e-5)
    with pytest.raises(ValueError, match="guidance_model"):
        sample(good, noise, labels, num_steps=3, delta_t=0.3, semantic_channels=2, guidance_scale_sem=2.0)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampling_is_deterministic_restores_training_mode_and_supports_bf16_autocast(method):
    model = _tiny_model(4).train()
    noise, labels = _noise((2, 6, 4, 4), dtype=torch.float32), torch.tensor([0, 1])
    kwargs = dict(num_steps=6, method=method, delta_t=0.3, semantic_channels=2)
    a = sample(model, noise, labels, **kwargs)
    assert model.training  # eval inside (no label dropout, no REPA tuple), restored after
    assert torch.equal(a, sample(model, noise, labels, **kwargs))
    # Same seed -> same noise -> bit-identical samples from a freshly built model.
    noise_again = _noise((2, 6, 4, 4), dtype=torch.float32)
    assert torch.equal(a, sample(_tiny_model(4), noise_again, labels, **kwargs))
    low = sample(model, noise, labels, autocast_dtype=torch.bfloat16, **kwargs)
    assert low.dtype == torch.float32 and not torch.equal(low, a)
    assert torch.allclose(low, a, atol=0.1 * a.abs().max().item())


def test_balanced_labels_and_the_global_index_rule():
    labels = balanced_labels(9, num_classes=3, per_class=2, seed=0)
    assert labels[:6].tolist() == [0, 0, 1, 1, 2, 2]
    assert ((0 <= labels[6:]) & (labels[6:] < 3)).all()
    # Any split of the global indices (ranks, batches) gets the same labels.
    world = [labels_for_indices(torch.arange(rank, 9, 2), 3, 2, seed=0) for rank in range(2)]
    assert torch.equal(world[0], labels[0::2]) and torch.equal(world[1], labels[1::2])
    many = balanced_labels(1000 + 3 * 2, 3, 2, seed=1)[6:]
    assert torch.equal(many, balanced_labels(1006, 3, 2, seed=1)[6:])
    assert set(many.tolist()) == {0, 1, 2} and not torch.equal(many, balanced_labels(1006, 3, 2, seed=2)[6:])


def test_decode_texture_denormalises_texture_channels_only():
    latent = _noise((2, 5, 2, 2))
    mean, std = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE), torch.tensor([2.0, 0.5, 3.0], dtype=DTYPE)
    out = decode_texture(latent, 3, mean.view(1, 3, 1, 1), std, latent_multiplier=0.5)
    assert out.shape == (2, 3, 2, 2)
    for c in range(3):
        assert torch.allclose(out[:, c], latent[:, c] * std[c].item() / 0.5 + mean[c].item(), atol=1e-15)


def test_public_api_signatures():
    """The names other stages and users call (issue 2): build_model, load_weights, sample."""
    import inspect

    from sfd_core.checkpoints import load_weights

    assert list(inspect.signature(build_model).parameters) == ["name", "overrides"]
    assert list(inspect.signature(load_weights).parameters)[:2] == ["model", "path"]
    params = inspect.signature(sample).parameters
    assert list(params)[:3] == ["model", "noise", "labels"]
    keyword_only = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert {"num_steps", "method", "delta_t", "semantic_channels", "cfg_scale", "cfg_interval_start",
            "guidance_model", "guidance_scale_sem", "guidance_scale_tex", "timestep_shift", "atol", "rtol",
            "dopri5_per_phase"} <= keyword_only
    assert params["guidance_model"].default is None and params["dopri5_per_phase"].default is False
