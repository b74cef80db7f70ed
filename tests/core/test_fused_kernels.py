"""The Triton kernels of sfd_core.kernels against float64 references of the stock modules.

On a machine without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU machine the same tests run the compiled kernels on CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sfd_core.kernels import kernels_run_on
from sfd_core.kernels import norm_modulate as norm_module
from sfd_core.kernels.norm_modulate import norm_modulate, residual_norm_modulate
from sfd_core.kernels import qkv_norm_rope as qkv_module
from sfd_core.kernels.qkv_norm_rope import qkv_norm_rope
from sfd_core.kernels import swiglu as swiglu_module
from sfd_core.kernels.swiglu import swiglu
from sfd_core.models import build_model
from sfd_core.models.layers import RMSNorm, modulate
from sfd_core.models.rope import VisionRotaryEmbeddingFast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 results may differ from the stock modules by this many units in the last place: on a GPU only through the
# fp32 sum order of the RMS statistic (rarely one); Triton's CPU interpreter rounds fp32 -> bf16 toward zero
# instead of to nearest, which costs up to two more. RoPE sums two rounded O(1) terms, hence the atol.
BF16_ULPS = 1 if DEVICE == "cuda" else 3
BF16_TOLERANCE = dict(rtol=BF16_ULPS * 2 ** -7, atol=BF16_ULPS * 2 ** -6)   # atol: ulps of O(1) operands
pytestmark = pytest.mark.skipif(not kernels_run_on(torch.empty(0, device=DEVICE)),
                                reason="Triton is not installed")


def assert_backward_matches(fused, reference, inputs, reference_inputs, seed, tol):
    """Backpropagate the same random upstream gradients through the fused outputs and their float64 reference
    and compare the gradients of every input that has a reference (None entries are skipped)."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(t.shape, generator=gen).to(DEVICE) for t in reference]
    torch.autograd.backward(fused, grads)
    torch.autograd.backward(reference, [g.double() for g in grads])
    for got, want in zip(inputs, reference_inputs):
        if want is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=tol, atol=tol)


def stock_qkv_norm_rope(qkv, q_weight, k_weight, rope, num_heads, eps=1e-6):
    """The unfused path of Attention.forward, returning [B, N, H, D] like the kernel."""
    batch, tokens, width = qkv.shape
    q, k, v = qkv.view(batch, tokens, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    norm = RMSNorm(q.shape[-1], eps)
    q = rope(torch.func.functional_call(norm, {"weight": q_weight}, (q,)))
    k = rope(torch.func.functional_call(norm, {"weight": k_weight}, (k,)))
    return tuple(t.transpose(1, 2) for t in (q, k, v))


def qkv_case(head_dim, batch=2, grid=4, heads=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(batch, grid * grid, 3 * heads * head_dim, generator=gen) * 2 + 0.3).to(DEVICE, dtype)
    q_weight = (1 + 0.3 * torch.randn(head_dim, generator=gen)).to(DEVICE)
    k_weight = (1 + 0.3 * torch.randn(head_dim, generator=gen)).to(DEVICE)
    rope = VisionRotaryEmbeddingFast(head_dim, grid).to(DEVICE)
    return qkv, q_weight, k_weight, rope, heads


@pytest.mark.parametrize("head_dim", [8, 24])   # 24: not a power of two, like XL's 72
def test_qkv_norm_rope_matches_float64_forward_and_backward(head_dim):
    qkv, q_weight, k_weight, rope, heads = qkv_case(head_dim)
    inputs = [t.detach().requires_grad_() for t in (qkv, q_weight, k_weight)]
    fused = qkv_norm_rope(*inputs, rope.freqs_cos, rope.freqs_sin, heads, 1e-6)
    reference_inputs = [t.detach().double().requires_grad_() for t in (qkv, q_weight, k_weight)]
    reference = stock_qkv_norm_rope(*reference_inputs, rope.double(), heads)
    for got, want in zip(fused, reference):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert_backward_matches(fused, reference, inputs, reference_inputs, seed=1, tol=1e-4)


# (forward, backward) launches over 32 tokens: the defaults; one half-empty forward tile and three backward
# programs of 12 tokens, the last one part empty
@pytest.mark.parametrize("configs", [((1, 2), (2, 2, 8)), ((64, 4), (4, 2, 3))])
def test_qkv_norm_rope_with_bias_matches_float64_and_returns_the_bias_gradient(monkeypatch, configs):
    monkeypatch.setattr(qkv_module, "FORWARD_CONFIG", configs[0])
    monkeypatch.setattr(qkv_module, "BACKWARD_CONFIG", configs[1])
    qkv, q_weight, k_weight, rope, heads = qkv_case(24)   # 2 images x 16 tokens, 3 heads
    bias = (torch.randn(qkv.shape[-1], generator=torch.Generator().manual_seed(3)) * 0.5).to(DEVICE)
    inputs = [t.detach().requires_grad_() for t in (qkv, q_weight, k_weight, bias)]
    fused = qkv_norm_rope(*inputs[:3], rope.freqs_cos, rope.freqs_sin, heads, 1e-6, inputs[3])
    reference_inputs = [t.detach().double().requires_grad_() for t in (qkv, q_weight, k_weight, bias)]
    qkv64, q64, k64, bias64 = reference_inputs
    reference = stock_qkv_norm_rope(qkv64 + bias64, q64, k64, rope.double(), heads)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert_backward_matches(fused, reference, inputs, reference_inputs, seed=4, tol=1e-4)


def test_qkv_norm_rope_in_bf16_rounds_like_the_stock_modules():
    qkv, q_weight, k_weight, rope, heads = qkv_case(24, dtype=torch.bfloat16)
    fused = qkv_norm_rope(qkv, q_weight, k_weight, rope.freqs_cos, rope.freqs_sin, heads, 1e-6)
    stock = stock_qkv_norm_rope(qkv, q_weight, k_weight, rope, heads)
    for got, want in zip(fused, stock):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), **BF16_TOLERANCE)
    torch.testing.assert_close(fused[2], stock[2], rtol=0, atol=0)
    # with the bias: rounded to bf16 and added to the rounded product, like a bf16 linear layer's output
    bias = torch.randn(qkv.shape[-1], generator=torch.Generator().manual_seed(5)).to(DEVICE)
    fused = qkv_norm_rope(qkv, q_weight, k_weight, rope.freqs_cos, rope.freqs_sin, heads, 1e-6, bias)
    stock = stock_qkv_norm_rope(qkv + bias.to(qkv.dtype), q_weight, k_weight, rope, heads)
    for got, want in zip(fused, stock):
        torch.testing.assert_close(got.float(), want.float(), **BF16_TOLERANCE)


@pytest.mark.parametrize("with_bias", [False, True])
def test_qkv_norm_rope_passes_opcheck(with_bias):
    qkv, q_weight, k_weight, rope, heads = qkv_case(8, batch=1)
    bias = torch.randn(qkv.shape[-1], device=DEVICE).requires_grad_() if with_bias else None
    args = (qkv.requires_grad_(), q_weight.requires_grad_(), k_weight.requires_grad_(), rope.freqs_cos,
            rope.freqs_sin, heads, 1e-6, bias)
    torch.library.opcheck(qkv_norm_rope, args, test_utils=("test_schema", "test_autograd_registration",
                                                           "test_faketensor"))
    # the backward op too: its fake partials must have the real shape (compiled steps allocate by them)
    grad = torch.randn(*qkv.shape[:2], heads, qkv.shape[2] // (3 * heads), device=DEVICE)
    backward_args = (grad, grad, grad, qkv.detach(), q_weight.detach(), k_weight.detach(), rope.freqs_cos,
                     rope.freqs_sin, heads, 1e-6, None if bias is None else bias.detach())
    torch.library.opcheck(qkv_module.qkv_norm_rope_backward, backward_args, test_utils=("test_schema",
                                                                                       "test_faketensor"))


def test_swiglu_matches_float64_forward_and_backward():
    gen = torch.Generator().manual_seed(2)
    h = (torch.randn(3, 5, 2 * 40, generator=gen) * 3).to(DEVICE).requires_grad_()   # 40: partial tiles
    reference_h = h.detach().double().requires_grad_()
    gate, value = reference_h.chunk(2, dim=-1)
    reference = F.silu(gate) * value
    out = swiglu(h)
    torch.testing.assert_close(out.double(), reference.detach(), rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE)
    out.backward(grad)
    reference.backward(grad.double())
    torch.testing.assert_close(h.grad.double(), reference_h.grad, rtol=1e-5, atol=1e-5)


def test_swiglu_with_bias_matches_float64_and_returns_the_bias_gradient():
    # 3 x 15 rows against 32-row backward tiles, 40 columns against 128: partial tiles both ways
    gen = torch.Generator().manual_seed(4)
    h = (torch.randn(3, 15, 2 * 40, generator=gen) * 3).to(DEVICE).requires_grad_()
    bias = torch.randn(2 * 40, generator=gen).to(DEVICE).requires_grad_()
    reference_h, reference_bias = (t.detach().double().requires_grad_() for t in (h, bias))
    gate, value = (reference_h + reference_bias).chunk(2, dim=-1)
    reference = F.silu(gate) * value
    out = swiglu(h, bias)
    torch.testing.assert_close(out.double(), reference.detach(), rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE)
    out.backward(grad)
    reference.backward(grad.double())
    torch.testing.assert_close(h.grad.double(), reference_h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad.double(), reference_bias.grad, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(swiglu, (h.detach().requires_grad_(), bias.detach().requires_grad_()),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(swiglu_module.swiglu_backward, (grad, h.detach(), bias.detach()),
                          test_utils=("test_schema", "test_faketensor"))


def test_swiglu_in_bf16_rounds_like_the_stock_module_and_passes_opcheck():
    h = torch.randn(4, 2 * 24, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    gate, value = h.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(h).float(), (F.silu(gate) * value).float(), **BF16_TOLERANCE)
    torch.library.opcheck(swiglu, (h.float().requires_grad_(),),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def stock_norm_modulate(x, weight, shift, scale, y=None, gate=None, eps=1e-6):
    """The unfused block code: optional gated residual, then modulate(RMSNorm(x)); returns (stream, h)."""
    if y is not None:
        x = x + gate.unsqueeze(1) * y
    norm = RMSNorm(x.shape[-1], eps)
    return x, modulate(torch.func.functional_call(norm, {"weight": weight}, (x,)), shift, scale)


def norm_modulate_case(batch=3, tokens=10, width=40, dtype=torch.float32, seed=5):
    """x, y [B, N, C], gate, shift, scale [B, C] and the norm weight; width 40 leaves a partial column tile."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=gen) * 2 + 0.3
    y = torch.randn(batch, tokens, width, generator=gen)
    gate, shift = torch.randn(2, batch, width, generator=gen)
    scale = 0.5 * torch.randn(batch, width, generator=gen)
    weight = 1 + 0.3 * torch.randn(width, generator=gen)
    return [t.to(DEVICE, dtype) for t in (x, y, gate, shift, scale)] + [weight.to(DEVICE)]


@pytest.mark.parametrize("residual", [False, True])
def test_norm_modulate_matches_float64_forward_and_backward(residual):
    # 3 images x 10 tokens in row tiles of 4: tiles that straddle two images and a partial last tile
    x, y, gate, shift, scale, weight = norm_modulate_case()
    inputs = [t.detach().requires_grad_() for t in (x, y, gate, weight, shift, scale)]
    reference_inputs = [t.detach().double().requires_grad_() for t in (x, y, gate, weight, shift, scale)]
    if residual:
        fused = residual_norm_modulate(*inputs, 1e-6)
        x_ref, y_ref, gate_ref, *rest = reference_inputs
        reference = stock_norm_modulate(x_ref, *rest, y=y_ref, gate=gate_ref)
    else:
        inputs[1] = inputs[2] = reference_inputs[1] = reference_inputs[2] = None
        fused = (norm_modulate(inputs[0], *inputs[3:], 1e-6),)
        reference = stock_norm_modulate(reference_inputs[0], *reference_inputs[3:])[1:]
    for got, want in zip(fused, reference):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert_backward_matches(fused, reference, inputs, reference_inputs, seed=6, tol=1e-5)


def test_norm_modulate_in_bf16_rounds_like_the_stock_modules():
    x, y, gate, shift, scale, weight = norm_modulate_case(dtype=torch.bfloat16)
    stream, h = residual_norm_modulate(x, y, gate, weight, shift, scale, 1e-6)
    want_stream, want_h = stock_norm_modulate(x, weight, shift, scale, y=y, gate=gate)
    for got, want in ((stream, want_stream), (h, want_h), (norm_modulate(x, weight, shift, scale, 1e-6),
                                                          stock_norm_modulate(x, weight, shift, scale)[1])):
        assert got.dtype == torch.bfloat16
        # h sums a rounded O(1) product and shift: an ulp of each
        torch.testing.assert_close(got.float(), want.float(), **BF16_TOLERANCE)
    # an fp32 stream (the default residual) under bf16 conditioning comes out fp32, like the eager promotion
    h32 = norm_modulate(x.float(), weight, shift, scale, 1e-6)
    assert h32.dtype == torch.float32


def test_norm_modulate_ops_pass_opcheck():
    x, y, gate, shift, scale, weight = (t.requires_grad_() for t in norm_modulate_case(batch=2, tokens=4, width=8))
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(norm_modulate, (x, weight, shift, scale, 1e-6), test_utils=checks)
    torch.library.opcheck(residual_norm_modulate, (x, y, gate, weight, shift, scale, 1e-6), test_utils=checks)


@pytest.mark.parametrize("residual,with_bias", [(False, False), (True, False), (True, True)])
def test_norm_modulate_token_sums_match_float64(residual, with_bias):
    # 10 tokens x 40 columns against 32-token tiles and 64-column programs: both edges masked
    x, y, _, _, _, _ = norm_modulate_case()
    gen = torch.Generator().manual_seed(11)
    dh, dx = (torch.randn(x.shape, generator=gen) for _ in range(2))
    bias = torch.randn(x.shape[2], generator=gen) if with_bias else None
    rstd = torch.rsqrt(x.double().square().mean(-1) + 1e-6)
    args = (dh, x, rstd.float(), dx if residual else None, y if residual else None, bias)
    sums = norm_module.norm_modulate_token_sums(*args)
    normed = x.double() * rstd.unsqueeze(-1)
    y_used = y.double() + (bias.double() if with_bias else 0)
    zeros = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64)
    want = torch.stack([dh.double().sum(1), (dh.double() * normed).sum(1),
                        (dx.double() * y_used).sum(1) if residual else zeros,
                        dx.double().sum(1) if residual else zeros], 1)
    torch.testing.assert_close(sums.double(), want, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(norm_module.norm_modulate_token_sums, args, test_utils=("test_schema", "test_faketensor"))


def test_residual_norm_modulate_with_y_bias_matches_float64():
    # y is a linear output before its bias: the op adds the bias and returns its gradient
    x, y, gate, shift, scale, weight = norm_modulate_case()
    bias = torch.randn(x.shape[2], generator=torch.Generator().manual_seed(12))
    inputs = [t.clone().requires_grad_() for t in (x, y, gate, weight, shift, scale, bias)]
    reference_inputs = [t.detach().double().requires_grad_() for t in inputs]
    x_ref, y_ref, gate_ref, weight_ref, shift_ref, scale_ref, bias_ref = reference_inputs
    fused = residual_norm_modulate(*inputs[:6], 1e-6, inputs[6])
    reference = stock_norm_modulate(x_ref, weight_ref, shift_ref, scale_ref, y=y_ref + bias_ref, gate=gate_ref)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    grads = [torch.randn(t.shape, generator=torch.Generator().manual_seed(13)) for t in fused]
    torch.autograd.backward(fused, grads)
    torch.autograd.backward(reference, [g.double() for g in grads])
    for name, got, want in zip(("x", "y", "gate", "weight", "shift", "scale", "bias"), inputs, reference_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5, msg=name)
    torch.library.opcheck(residual_norm_modulate, (*[t.detach().requires_grad_() for t in inputs[:6]], 1e-6,
                                                   inputs[6].detach().requires_grad_()),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_norm_modulate_rejects_mismatched_conditioning():
    x, y, gate, shift, scale, weight = norm_modulate_case()
    with pytest.raises(ValueError, match="shift, scale"):
        norm_modulate(x, weight, shift[:1], scale[:1], 1e-6)


def autograd_node_names(tensor: torch.Tensor) -> set[str]:
    """Names of every node in the autograd graph that produced ``tensor``."""
    visited, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in visited:
            visited.add(node)
            names.add(node.name())
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_fused_kernels_can_be_chosen_by_name():
    model = build_model("LightningDiT-tiny/1", input_size=4, fused_kernels=["swiglu"])
    block = model.blocks[0]
    assert (block.fused, block.attn.fused, block.mlp.fused, model.final_layer.fused) == (False, False, True, False)
    assert build_model("LightningDiT-tiny/1", input_size=4, fused_kernels=True).fused_kernels == {
        "norm_modulate", "qkv_norm_rope", "swiglu"}
    with pytest.raises(ValueError, match="unknown fused kernels"):
        build_model("LightningDiT-tiny/1", input_size=4, fused_kernels=["flash"])


# the REPA tap after the last block, or between blocks with a block's MLP residual pending into the final layer
@pytest.mark.parametrize("depth,repa_depth", [(2, 2), (3, 1)])
def test_fused_tiny_model_matches_the_stock_model_and_loads_its_weights(depth, repa_depth):
    torch.manual_seed(0)
    sizes = dict(input_size=4, depth=depth, repa_depth=repa_depth)
    stock = build_model("LightningDiT-tiny/1", **sizes).to(DEVICE)
    fused = build_model("LightningDiT-tiny/1", **sizes, fused_kernels=True).to(DEVICE)
    with torch.no_grad():
        for p in stock.parameters():
            p.normal_(0, 0.1)
    fused.load_state_dict(stock.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 48, 4, 4, generator=gen).to(DEVICE)
    t = (torch.rand(2, generator=gen).to(DEVICE), torch.rand(2, generator=gen).to(DEVICE))
    y = torch.tensor([3, 7], device=DEVICE)
    drop = torch.tensor([False, True], device=DEVICE)
    outs = []
    for model in (stock, fused):
        velocity, projection = model(x, t, y, drop_labels=drop)
        outs.append((velocity, projection, autograd_node_names(velocity)))
        (velocity.square().mean() + projection.square().mean()).backward()
        outs[-1] += ({n: p.grad for n, p in model.named_parameters() if p.grad is not None},)
    (v0, p0, nodes0, g0), (v1, p1, nodes1, g1) = outs
    # the fused model really took the kernels (equal outputs alone would also hold for a silent fallback)
    for op in ("sfd_qkv_norm_rope", "sfd_swiglu", "sfd_norm_modulate", "sfd_residual_norm_modulate"):
        assert any(op in name for name in nodes1) and not any(op in name for name in nodes0), op
    torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-5)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-3, atol=1e-5, msg=name)


def test_fused_tiny_model_traces_into_one_graph_with_the_same_gradients():
    """What torch.compile traces (the ops' fake shapes, their autograd formulas, the partial sums after the
    kernels) matches the eager fused model; aot_eager runs the traced graphs without Inductor's code generation."""
    torch.manual_seed(0)
    model = build_model("LightningDiT-tiny/1", input_size=4, depth=2, repa_depth=1, fused_kernels=True).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 48, 4, 4, generator=gen).to(DEVICE)
    t = (torch.rand(2, generator=gen).to(DEVICE), torch.rand(2, generator=gen).to(DEVICE))
    y, drop = torch.tensor([3, 7], device=DEVICE), torch.tensor([False, True], device=DEVICE)
    grads = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad(set_to_none=True)
        velocity, projection = run(x, t, y, drop_labels=drop)
        (velocity.square().mean() + projection.square().mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
