"""AdamWWithEMA against a float64 AdamW + EMA written out, through torch's AdamW and through the fused Triton
kernel (in Triton's interpreter on CPU: tests/conftest.py sets TRITON_INTERPRET=1), with fp32 weights and with
bf16 working weights over fp32 masters, and its state across paths."""
import copy

import pytest
import torch

from sfd_core.kernels import kernels_run_on
from sfd_core.models import build_model, model_config
from sfd_core.optim import AdamWWithEMA, autocast_weights
from sfd_core.transport import LossConfig, sfd_training_loss

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
            param.grad = g.to(param.dtype)   # a new tensor, as after a backward
        update.step()
        update.zero_grad()


def bf16_grads(grads, low: list[bool]):
    """The gradients as the bf16 weights get them (the reference then sees the same rounded values)."""
    return [[g.bfloat16().float() if b else g for g, b in zip(step, low)] for step in grads]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused, config", [(False, None), (True, None), (True, (16, 1, 1)), (True, (8, 1, 2))])
def test_update_matches_float64_adamw_then_ema(fused, config, device, monkeypatch):
    """Small blocks: the (7, 5) and (3, 2, 4) weights span full, unmasked blocks and a masked tail, in one or
    several blocks per program."""
    if config:
        from sfd_core.kernels import adamw_ema
        monkeypatch.setattr(adamw_ema, "CONFIGS", {False: config, True: config})
    params, ema, grads = make_params(device=device)
    expected_p, expected_e = reference(params, ema, grads, steps=3)
    update = AdamWWithEMA(params, ema, fused=fused, **HYPER)
    assert update.fused == (fused and kernels_run_on(params[0]))
    run(update, grads, range(3))
    for got, want in zip(params + ema, expected_p + expected_e):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused, config", [(False, None), (True, None), (True, (8, 1, 2))])
def test_bf16_weights_follow_float64_masters(fused, config, device, monkeypatch):
    """The masters take the float64 AdamW path from the bf16 gradients; each bf16 weight is its master rounded."""
    if config:
        from sfd_core.kernels import adamw_ema
        monkeypatch.setattr(adamw_ema, "CONFIGS", {False: config, True: config})
    params, ema, grads = make_params(device=device)
    low = [True, False, True]
    grads = bf16_grads(grads, low)
    expected_p, expected_e = reference(params, ema, grads, steps=3)
    update = AdamWWithEMA(params, ema, fused=fused, bf16_weights=[p for p, b in zip(params, low) if b], **HYPER)
    assert [p.dtype for p in params] == [torch.bfloat16, torch.float32, torch.bfloat16]
    run(update, grads, range(3))
    for master, want in zip(update.master_weights + ema, expected_p + expected_e):
        assert master.dtype == torch.float32
        torch.testing.assert_close(master.detach().double(), want, rtol=1e-5, atol=1e-6)
    for param, master, b in zip(params, update.master_weights, low):
        assert torch.equal(param.detach(), master.to(param.dtype)) and (param is master) != b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16", [False, True])
def test_state_saved_by_the_fused_update_resumes_through_torch_adamw(bf16, device):
    """A checkpoint's optimizer state and masters are the same objects whichever path wrote them."""
    def start():
        params, ema, _ = make_params(device=device)
        return params, ema, dict(bf16_weights=params[:2] if bf16 else (), **HYPER)

    _, _, grads = make_params(device=device)
    grads = bf16_grads(grads, [bf16, bf16, False])
    params, ema, options = start()
    straight = AdamWWithEMA(params, ema, fused=True, **options)
    run(straight, grads, range(4))

    params2, ema2, options = start()
    first = AdamWWithEMA(params2, ema2, fused=True, **options)
    run(first, grads, range(2))
    params3, ema3, options = start()
    resumed = AdamWWithEMA(params3, ema3, fused=False, **options)
    with torch.no_grad():   # what loading a checkpoint of masters, EMA and optimizer state does
        for dst, src in zip(resumed.master_weights + resumed.params + ema3,
                            first.master_weights + first.params + ema2):
            dst.copy_(src)
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    run(resumed, grads, range(2, 4))
    for got, want in zip(resumed.master_weights + params3 + ema3, straight.master_weights + params + ema):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True])
def test_gradients_updated_in_place_reuse_the_pointer_table(fused):
    """As in a captured CUDA graph: the same gradient tensors every step, their values rewritten."""
    params, ema, grads = make_params()
    expected_p, expected_e = reference(params, ema, grads, steps=3)
    update = AdamWWithEMA(params, ema, fused=fused, **HYPER)
    static = [torch.empty_like(p) for p in params]
    tables = []
    for step in range(3):
        for p, buffer, g in zip(params, static, grads[step]):
            p.grad = buffer.copy_(g)
        update.step()
        tables.append(update._tables[False][2] if update.fused else None)
    assert all(table is tables[0] for table in tables)   # built once, no copy to capture in later steps
    for got, want in zip(params + ema, expected_p + expected_e):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("low_precision_residual", [False, True])
def test_bf16_weights_give_the_autocast_loss_and_gradients_of_fp32_weights(low_precision_residual):
    """Autocast rounds the linear/conv weights to bf16 before each use and their gradients are bf16 matmul
    outputs, so bf16 working weights change nothing but the casts: the same loss and gradients, bit for bit."""
    torch.manual_seed(0)
    name = "LightningDiT-tiny/1"
    cfg = model_config(name)
    fp32_model = build_model(name, low_precision_residual=low_precision_residual).train()
    bf16_model = copy.deepcopy(fp32_model)
    params = [p for p in bf16_model.parameters() if p.requires_grad]
    low = autocast_weights(bf16_model)
    assert {id(p) for p in low} == {id(p) for m in bf16_model.modules()
                                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for p in m.parameters()}
    AdamWWithEMA(params, [p.detach().clone() for p in params], lr=1e-3, bf16_weights=low)
    n, grid = cfg["input_size"], cfg["input_size"] // cfg["patch_size"]
    x1, y = torch.randn(4, cfg["in_channels"], n, n), torch.randint(0, cfg["num_classes"], (4,))
    dino = torch.randn(4, cfg["repa_out_dim"], grid, grid)
    losses = []
    for model in (fp32_model, bf16_model):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sfd_training_loss(model, x1, y, dino, LossConfig(semantic_channels=cfg["semantic_channels"]))
        loss["loss"].backward()
        losses.append(loss["loss"].detach())
    assert torch.equal(*losses)
    for (name_, a), b in zip(fp32_model.named_parameters(), bf16_model.parameters()):
        assert (a.grad is None) == (b.grad is None), name_
        if a.grad is not None:
            assert b.grad.dtype == b.dtype and torch.equal(a.grad.to(b.dtype), b.grad), name_


def test_bf16_weights_must_be_fp32_params_of_the_update():
    params, ema, _ = make_params()
    with pytest.raises(ValueError, match="among params"):
        AdamWWithEMA(params[:2], ema[:2], lr=1e-3, bf16_weights=params[2:])
    half = [torch.nn.Parameter(p.detach().bfloat16()) for p in params]
    with pytest.raises(ValueError, match="start as fp32"):
        AdamWWithEMA(half, ema, lr=1e-3, bf16_weights=half)


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
    with pytest.raises(ValueError, match="aligned float32 param"):
        update.step()


def test_block_map_covers_every_value_once():
    from sfd_core.kernels.adamw_ema import block_map

    sizes = [5, 4096, 4097, 1, 9000]
    tensor_of_block, start = block_map(sizes, 4096, torch.device("cpu"))
    covered = [(int(t), int(s) + k) for t, s in zip(tensor_of_block, start) for k in range(4096)
               if int(s) + k < sizes[int(t)]]
    assert sorted(covered) == [(t, i) for t, n in enumerate(sizes) for i in range(n)]
