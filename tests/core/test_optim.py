"""AdamWWithEMA against a float64 AdamW + EMA written out, through torch's AdamW and through the fused Triton
kernel (in Triton's interpreter on CPU: tests/conftest.py sets TRITON_INTERPRET=1), and its state across paths."""
import pytest
import torch

from sfd_core.kernels import kernels_run_on
from sfd_core.optim import AdamWWithEMA

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, ema_decay=0.9)
SHAPES = [(7, 5), (5,), (3, 2, 4)]


def make_params(seed: int = 0, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(device)) for s in SHAPES]
    ema = [p.detach().clone() + 0.1 for p in params]   # off the weights, so the EMA term is exercised
    grads = [[torch.randn(s, generator=generator).to(device) for s in SHAPES] for _ in range(4)]
    return params, ema, grads


def reference(params, ema, grads, steps: int):
    """Decoupled-weight-decay Adam with bias correction, then the EMA, in float64."""
    lr, (b1, b2), eps, wd, decay = (HYPER[k] for k in ("lr", "betas", "eps", "weight_decay", "ema_decay"))
    p = [x.detach().double().clone() for x in params]
    e = [x.double().clone() for x in ema]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    for t in range(1, steps + 1):
        for i, g in enumerate(grads[t - 1]):
            g = g.double()
            p[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            p[i] -= lr * (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
            e[i] = decay * e[i] + (1 - decay) * p[i]
    return p, e


def run(update: AdamWWithEMA, grads, steps: range):
    for t in steps:
        for param, g in zip(update.params, grads[t]):
            param.grad = g.clone()
        update.step()
        update.zero_grad()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused, config", [(False, None), (True, None), (True, (16, 1, 1)), (True, (8, 1, 2))])
def test_update_matches_float64_adamw_then_ema(fused, config, device, monkeypatch):
    """Small blocks: the (7, 5) and (3, 2, 4) weights span full, unmasked blocks and a masked tail, in one or
    several blocks per program."""
    if config:
        from sfd_core.kernels import adamw_ema
        monkeypatch.setattr(adamw_ema, "CONFIG", config)
    params, ema, grads = make_params(device=device)
    expected_p, expected_e = reference(params, ema, grads, steps=3)
    update = AdamWWithEMA(params, ema, fused=fused, **HYPER)
    assert update.fused == (fused and kernels_run_on(params[0]))
    run(update, grads, range(3))
    for got, want in zip(params + ema, expected_p + expected_e):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("device", DEVICES)
def test_state_saved_by_the_fused_update_resumes_through_torch_adamw(device):
    """A checkpoint's optimizer state is the same object whichever path wrote it."""
    params, ema, grads = make_params(device=device)
    straight = AdamWWithEMA(params, ema, fused=True, **HYPER)
    run(straight, grads, range(4))

    params2, ema2, _ = make_params(device=device)
    first = AdamWWithEMA(params2, ema2, fused=True, **HYPER)
    run(first, grads, range(2))
    resumed = AdamWWithEMA(params2, ema2, fused=False, **HYPER)
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    run(resumed, grads, range(2, 4))
    for got, want in zip(params2 + ema2, params + ema):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)


def test_unpaired_ema_is_rejected():
    params, ema, _ = make_params()
    with pytest.raises(ValueError, match="pair up"):
        AdamWWithEMA(params, ema[:-1], lr=1e-3)
    with pytest.raises(ValueError, match="pair up"):
        AdamWWithEMA(params, [e.flatten() for e in ema], lr=1e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_weights_without_a_gradient_keep_their_value_and_ema(fused):
    params, ema, grads = make_params()
    before_p, before_e = params[1].detach().clone(), ema[1].clone()
    update = AdamWWithEMA(params, ema, fused=fused, **HYPER)
    for step in range(2):
        params[0].grad, params[2].grad = grads[step][0], grads[step][2]
        update.step()
        update.zero_grad()
    assert torch.equal(params[1].detach(), before_p) and torch.equal(ema[1], before_e)
    assert not update.optimizer.state[params[1]]
    assert float(update.optimizer.state[params[0]]["step"]) == 2.0


def test_fused_update_rejects_a_non_fp32_weight():
    params, ema, grads = make_params()
    if not kernels_run_on(params[0]):
        pytest.skip("Triton is not installed")
    half = [torch.nn.Parameter(p.detach().bfloat16()) for p in params]
    update = AdamWWithEMA(half, [e.bfloat16() for e in ema], **HYPER)
    for p, g in zip(half, grads[0]):
        p.grad = g.bfloat16()
    with pytest.raises(ValueError, match="aligned fp32 param"):
        update.step()


def test_block_map_covers_every_value_once():
    from sfd_core.kernels.adamw_ema import block_map

    sizes = [5, 4096, 4097, 1, 9000]
    tensor_of_block, start = block_map(sizes, 4096, torch.device("cpu"))
    covered = [(int(t), int(s) + k) for t, s in zip(tensor_of_block, start) for k in range(4096)
               if int(s) + k < sizes[int(t)]]
    assert sorted(covered) == [(t, i) for t, n in enumerate(sizes) for i in range(n)]
