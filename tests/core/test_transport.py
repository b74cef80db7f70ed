"""SFD transport: time mapping, interpolation and the loss terms against float64 hand computations."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sfd_core.transport import (LossConfig, async_times, interpolate, repa_loss, sample_time,
                                sfd_training_loss)

DTYPE = torch.float64


class RecordingVelocityNet(nn.Module):
    """Velocity = 1x1 conv + a time/label term; in training mode also a per-token REPA projection.
    Remembers its last inputs so tests can check what the loss fed it."""

    def __init__(self, channels: int, feat_dim: int):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.mix = nn.Parameter(torch.randn(channels, channels, generator=gen, dtype=DTYPE) / channels)
        self.proj = nn.Parameter(torch.randn(feat_dim, channels, generator=gen, dtype=DTYPE))
        self.inputs = None

    def forward(self, x, t, y):
        t_tex, t_sem = t
        self.inputs = (x.detach().clone(), t_tex.clone(), t_sem.clone())
        v = torch.einsum("oc,bchw->bohw", self.mix, x) + (t_tex + 2 * t_sem + 0.1 * y).view(-1, 1, 1, 1)
        if not self.training:
            return v
        return v, torch.einsum("dc,bcn->bnd", self.proj, x.flatten(2))


def _reference_times(t: list[float], delta_t: float):
    tau = [ti * (1 + delta_t) for ti in t]
    return tau, [max(s - delta_t, 0.0) for s in tau], [min(s, 1.0) for s in tau]


@pytest.mark.parametrize("delta_t", [0.0, 0.3, 1.0])
def test_async_times_match_float64_reference_including_boundaries(delta_t):
    scale = 1 + delta_t
    # 0, the point where tau == delta_t (texture starts), where tau == 1 (semantic done), and 1.
    t = [0.0, 0.05, delta_t / scale, 0.5, 1 / scale, 0.97, 1.0]
    tau, t_tex, t_sem = async_times(torch.tensor(t, dtype=DTYPE), delta_t)
    ref_tau, ref_tex, ref_sem = _reference_times(t, delta_t)
    assert torch.allclose(tau, torch.tensor(ref_tau, dtype=DTYPE), rtol=0, atol=1e-15)
    assert torch.allclose(t_tex, torch.tensor(ref_tex, dtype=DTYPE), rtol=0, atol=1e-15)
    assert torch.allclose(t_sem, torch.tensor(ref_sem, dtype=DTYPE), rtol=0, atol=1e-15)
    assert t_tex.min() >= 0 and t_sem.max() <= 1


def test_zero_delta_t_is_exactly_synchronous():
    t = sample_time(1000, torch.Generator().manual_seed(0))
    tau, t_tex, t_sem = async_times(t, 0.0)
    assert torch.equal(tau, t) and torch.equal(t_tex, t) and torch.equal(t_sem, t)


def test_sample_time_is_seeded_logit_normal():
    a = sample_time(20000, torch.Generator().manual_seed(7))
    b = sample_time(20000, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_time(20000, torch.Generator().manual_seed(8)))
    logits = torch.logit(a.double())
    assert 0 < a.min() and a.max() < 1
    assert abs(logits.mean().item()) < 0.03 and abs(logits.std().item() - 1) < 0.03


def test_interpolate_uses_each_streams_time_on_its_channels():
    gen = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, 5, 2, 2, generator=gen, dtype=DTYPE), torch.randn(2, 5, 2, 2, generator=gen, dtype=DTYPE)
    t_tex, t_sem = torch.tensor([0.0, 0.4], dtype=DTYPE), torch.tensor([0.3, 1.0], dtype=DTYPE)
    x_t, u = interpolate(x0, x1, t_tex, t_sem, semantic_channels=2)
    for b in range(2):
        for c in range(5):
            t = (t_tex if c < 3 else t_sem)[b].item()
            assert torch.allclose(x_t[b, c], t * x1[b, c] + (1 - t) * x0[b, c], atol=1e-15)
    assert torch.equal(u, x1 - x0)


def _hand_loss(v, u, proj, feats, cfg: LossConfig) -> dict[str, float]:
    """Loop-based float64 reference of SPEC §5.2."""
    batch, channels, height, width = v.shape
    mse = cos = repa = 0.0
    for b in range(batch):
        sq = 0.0
        for c in range(channels):
            weight = cfg.semantic_weight if c >= channels - cfg.semantic_channels else 1.0
            sq += weight * ((v[b, c] - u[b, c]) ** 2).sum().item()
        mse += sq / (channels * height * width) / batch
        pixel_cos = [(v[b, :, i, j] @ u[b, :, i, j] / (v[b, :, i, j].norm() * u[b, :, i, j].norm())).item()
                     for i in range(height) for j in range(width)]
        cos += sum(1 - p for p in pixel_cos) / len(pixel_cos) / batch
        tokens = feats[b].flatten(1).T  # [h*w, D], row-major tokens
        token_cos = [(tokens[n] @ proj[b, n] / (tokens[n].norm() * proj[b, n].norm())).item()
                     for n in range(tokens.shape[0])]
        one_minus_cos = sum(1 - p for p in token_cos) / len(token_cos)
        sq_err = ((tokens - proj[b]) ** 2).mean().item()
        per_sample = {"cos": one_minus_cos, "mse": sq_err, "cos_mse": (one_minus_cos + sq_err) / 2}[cfg.repa_type]
        repa += cfg.repa_weight * per_sample / batch
    if not cfg.use_cosine_loss:
        cos = 0.0
    return {"mse": mse, "cos": cos, "repa": repa, "loss": mse + cos + repa}


@pytest.mark.parametrize("repa_type,use_cos", [("cos", True), ("mse", True), ("cos_mse", False)])
def test_loss_terms_match_float64_hand_computation(repa_type, use_cos):
    cfg = LossConfig(delta_t=0.3, semantic_channels=2, semantic_weight=2.0, use_cosine_loss=use_cos,
                     repa_weight=0.5, repa_type=repa_type)
    model = RecordingVelocityNet(channels=5, feat_dim=6).train()
    data_gen = torch.Generator().manual_seed(11)
    x1 = torch.randn(3, 5, 2, 3, generator=data_gen, dtype=DTYPE)
    feats = torch.randn(3, 6, 2, 3, generator=data_gen, dtype=DTYPE)
    y = torch.tensor([0, 4, 9])
    out = sfd_training_loss(model, x1, y, feats, cfg, generator=torch.Generator().manual_seed(5))

    # Documented draw order: flow times, then noise, from the same generator.
    gen = torch.Generator().manual_seed(5)
    t = torch.sigmoid(torch.randn(3, generator=gen, dtype=DTYPE)).tolist()
    x0 = torch.randn(x1.shape, generator=gen, dtype=DTYPE)
    _, ref_tex, ref_sem = _reference_times(t, 0.3)
    x_t = x1.clone()
    for b in range(3):
        x_t[b, :3] = ref_tex[b] * x1[b, :3] + (1 - ref_tex[b]) * x0[b, :3]
        x_t[b, 3:] = ref_sem[b] * x1[b, 3:] + (1 - ref_sem[b]) * x0[b, 3:]
    seen_x, seen_tex, seen_sem = model.inputs
    assert torch.allclose(seen_x, x_t, atol=1e-12)
    assert torch.allclose(seen_tex, torch.tensor(ref_tex, dtype=DTYPE), atol=1e-15)
    assert torch.allclose(seen_sem, torch.tensor(ref_sem, dtype=DTYPE), atol=1e-15)

    with torch.no_grad():
        v, proj = model(x_t, (seen_tex, seen_sem), y)
    ref = _hand_loss(v, x1 - x0, proj, feats, cfg)
    for key, value in ref.items():
        assert out[key].shape == () and math.isclose(out[key].item(), value, rel_tol=1e-10, abs_tol=1e-12), key
    assert out["repa"].item() > 0 and (out["cos"].item() > 0) == use_cos


def test_zero_delta_t_loss_equals_synchronous_flow_matching():
    cfg = LossConfig(delta_t=0.0, semantic_channels=2, repa_weight=0.0)
    model = RecordingVelocityNet(channels=4, feat_dim=3).eval()
    x1 = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    out = sfd_training_loss(model, x1, torch.zeros(4, dtype=torch.long), cfg=cfg,
                            generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    t = torch.sigmoid(torch.randn(4, generator=gen, dtype=DTYPE))
    x0 = torch.randn(x1.shape, generator=gen, dtype=DTYPE)
    seen_x, seen_tex, seen_sem = model.inputs
    assert torch.equal(seen_tex, t) and torch.equal(seen_sem, t)
    assert torch.allclose(seen_x, t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0, atol=1e-14)
    assert out["repa"].item() == 0.0


def test_no_semantic_channels_is_plain_flow_matching_even_with_delta_t():
    cfg = LossConfig(delta_t=0.3, semantic_channels=0, repa_weight=0.0)
    model = RecordingVelocityNet(channels=3, feat_dim=2).eval()
    out = sfd_training_loss(model, torch.randn(64, 3, 1, 1, dtype=DTYPE), torch.zeros(64, dtype=torch.long),
                            cfg=cfg, generator=torch.Generator().manual_seed(0))
    _, seen_tex, seen_sem = model.inputs
    assert torch.equal(seen_tex, seen_sem) and 0 < seen_tex.min() and seen_tex.max() < 1
    assert torch.isfinite(out["loss"])


def test_loss_is_reproducible_with_a_generator_and_differentiable():
    cfg = LossConfig(semantic_channels=2, repa_weight=1.0)
    model = RecordingVelocityNet(channels=4, feat_dim=3).train()
    x1 = torch.randn(2, 4, 2, 2, dtype=DTYPE)
    feats = torch.randn(2, 3, 2, 2, dtype=DTYPE)
    y = torch.tensor([1, 2])
    a = sfd_training_loss(model, x1, y, feats, cfg, generator=torch.Generator().manual_seed(4))
    b = sfd_training_loss(model, x1, y, feats, cfg, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    a["loss"].backward()
    assert model.mix.grad is not None and model.proj.grad.abs().sum() > 0


def test_repa_shape_mismatch_and_missing_projection_are_errors():
    with pytest.raises(ValueError, match="does not match"):
        repa_loss(torch.zeros(1, 5, 3), torch.zeros(1, 3, 2, 2), "cos")
    model = RecordingVelocityNet(channels=4, feat_dim=3).eval()  # eval: no projection returned
    with pytest.raises(ValueError, match="no REPA projection"):
        sfd_training_loss(model, torch.zeros(1, 4, 2, 2, dtype=DTYPE), torch.zeros(1, dtype=torch.long),
                          torch.zeros(1, 3, 2, 2, dtype=DTYPE), LossConfig(semantic_channels=2))
    with pytest.raises(ValueError, match="repa_type"):
        LossConfig(repa_type="l1")
