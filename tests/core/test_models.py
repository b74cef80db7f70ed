"""LightningDiT / SFD network: numerics against independent float64 references, layout against SPEC 4 and 9."""
from __future__ import annotations

import math

import pytest
import torch

from sfd_core.models import MODEL_CONFIGS, build_model, guided_velocity
from sfd_core.models.layers import (Attention, RMSNorm, SwiGLU, sincos_pos_embed_2d, timestep_sinusoid)
from sfd_core.models.rope import VisionRotaryEmbeddingFast

SEED = 0


def randomize(module: torch.nn.Module, std: float = 0.1, seed: int = SEED) -> torch.nn.Module:
    """Random values in every parameter (init zeroes adaLN/final layers, which would hide wiring bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def tiny_sfd(**overrides):
    torch.manual_seed(SEED)
    kwargs = dict(input_size=4)
    kwargs.update(overrides)
    return build_model("LightningDiT-tiny/1", **kwargs)


def sfd_inputs(batch=3, channels=48, size=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    t = (torch.rand(batch, generator=gen), torch.rand(batch, generator=gen))
    y = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t, y


# ------------------------------------------------------------------------------------------ float64 references
def ref_rmsnorm(x, w, eps=1e-6):
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * w


def ref_rope_angle(dim_index: int, row: int, col: int, head_dim: int) -> float:
    axis_dim = head_dim // 2
    position = row if dim_index < axis_dim else col
    j = (dim_index % axis_dim) // 2                      # pair index within the axis half
    return position * 10000.0 ** (-2.0 * j / axis_dim)


def ref_rope(x, grid):  # x: [N, hd] float64, tokens row-major
    """Rotate each pair (2i, 2i+1) of token (row, col) by its angle: plain 2-D rotation formula."""
    n, hd = x.shape
    angles = torch.tensor([[ref_rope_angle(i, *divmod(token, grid), hd) for i in range(0, hd, 2)]
                           for token in range(n)], dtype=torch.float64)
    even, odd = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = even * angles.cos() - odd * angles.sin()
    out[:, 1::2] = odd * angles.cos() + even * angles.sin()
    return out


def ref_attention(attn: Attention, x, grid):
    """Naive per-sample, per-head attention in float64 from the module's weights."""
    sd = {k: v.double() for k, v in attn.state_dict().items()}
    b, n, dim = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    out = torch.zeros(b, n, dim, dtype=torch.float64)
    for bi in range(b):
        qkv = x[bi] @ sd["qkv.weight"].T + sd["qkv.bias"]          # [N, 3*dim], rows (3, heads, hd)
        per_head = []
        for h in range(heads):
            q = qkv[:, h * hd:(h + 1) * hd]
            k = qkv[:, dim + h * hd: dim + (h + 1) * hd]
            v = qkv[:, 2 * dim + h * hd: 2 * dim + (h + 1) * hd]
            q = ref_rope(ref_rmsnorm(q, sd["q_norm.weight"]), grid)
            k = ref_rope(ref_rmsnorm(k, sd["k_norm.weight"]), grid)
            scores = q @ k.T / math.sqrt(hd)
            weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
            per_head.append((weights / weights.sum(-1, keepdim=True)) @ v)
        out[bi] = torch.cat(per_head, dim=-1) @ sd["proj.weight"].T + sd["proj.bias"]
    return out


def ref_timestep_embedding(t, dim=256):
    half = dim // 2
    rows = []
    for ti in t.double().tolist():
        freqs = [math.exp(-math.log(10000.0) * k / half) for k in range(half)]
        rows.append([math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs])
    return torch.tensor(rows, dtype=torch.float64)


def ref_pos_embed(dim, grid):
    quarter = dim // 4
    table = torch.zeros(grid * grid, dim, dtype=torch.float64)
    for h in range(grid):
        for w in range(grid):
            for k in range(quarter):
                omega = 10000.0 ** (-k / quarter)
                table[h * grid + w, k] = math.sin(w * omega)
                table[h * grid + w, quarter + k] = math.cos(w * omega)
                table[h * grid + w, 2 * quarter + k] = math.sin(h * omega)
                table[h * grid + w, 3 * quarter + k] = math.cos(h * omega)
    return table


def ref_forward(model, x, t_tex, t_sem, y):
    """Whole SFD LightningDiT forward in float64 from the state dict, written from SPEC 4.2."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    lin = lambda a, name: a @ sd[name + ".weight"].T + sd[name + ".bias"]
    silu = lambda a: a * torch.sigmoid(a)
    b, c_in, size, _ = x.shape
    p, g, hidden = model.patch_size, model.grid_size, model.hidden_size
    patches = x.double().reshape(b, c_in, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c_in * p * p)
    tokens = patches @ sd["x_embedder.proj.weight"].reshape(hidden, -1).T + sd["x_embedder.proj.bias"]
    tokens = tokens + sd["pos_embed"]

    def t_embed(prefix, t):
        return lin(silu(lin(ref_timestep_embedding(t), prefix + ".mlp.0")), prefix + ".mlp.2")

    cond = torch.cat([t_embed("t_embedder_sem", t_sem), t_embed("t_embedder_tex", t_tex)], dim=-1)
    cond = cond + sd["y_embedder.embedding_table.weight"][y]
    for i, block in enumerate(model.blocks):
        pre = f"blocks.{i}."
        mod = lin(silu(cond), pre + "adaLN_modulation.1").chunk(6, dim=-1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (m[:, None, :] for m in mod)
        h = ref_rmsnorm(tokens, sd[pre + "norm1.weight"]) * (1 + scale_a) + shift_a
        tokens = tokens + gate_a * ref_attention(block.attn, h, g)
        h = ref_rmsnorm(tokens, sd[pre + "norm2.weight"]) * (1 + scale_m) + shift_m
        hidden12 = lin(h, pre + "mlp.w12")
        f = hidden12.shape[-1] // 2
        tokens = tokens + gate_m * lin(silu(hidden12[..., :f]) * hidden12[..., f:], pre + "mlp.w3")
    shift, scale = (m[:, None, :] for m in lin(silu(cond), "final_layer.adaLN_modulation.1").chunk(2, dim=-1))
    out = lin(ref_rmsnorm(tokens, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift, "final_layer.linear")
    c_out = model.out_channels
    out = out.reshape(b, g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4).reshape(b, c_out, g * p, g * p)
    return out


# ----------------------------------------------------------------------------------------------------- layers
def test_rmsnorm_matches_float64():
    norm = randomize(RMSNorm(24), std=1.0)
    x = torch.randn(5, 7, 24) * 3
    expected = ref_rmsnorm(x.double(), norm.weight.double())
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=1e-5)
    # bf16 input: normalised in fp32, cast back before the fp32 weight (official order), result kept in bf16.
    xb = x.bfloat16()
    expected_bf16 = (ref_rmsnorm(xb.double(), 1.0).bfloat16().double() * norm.weight.double()).bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected_bf16.double(), rtol=2 ** -8, atol=1e-6)  # <= 1 bf16 ulp


def test_swiglu_matches_float64():
    mlp = randomize(SwiGLU(16, 40), std=0.3)
    x = torch.randn(3, 5, 16)
    sd = {k: v.double() for k, v in mlp.state_dict().items()}
    h = x.double() @ sd["w12.weight"].T + sd["w12.bias"]
    gate, value = h[..., :40], h[..., 40:]
    expected = (gate * torch.sigmoid(gate) * value) @ sd["w3.weight"].T + sd["w3.bias"]
    torch.testing.assert_close(mlp(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_timestep_sinusoid_cos_first_unscaled():
    t = torch.tensor([0.0, 0.013, 0.5, 1.0, 1.3])
    torch.testing.assert_close(timestep_sinusoid(t).double(), ref_timestep_embedding(t), rtol=1e-5, atol=2e-6)


def test_pos_embed_column_first_then_row():
    for dim, grid in [(32, 4), (64, 5)]:
        torch.testing.assert_close(sincos_pos_embed_2d(dim, grid), ref_pos_embed(dim, grid), rtol=0, atol=1e-12)


def test_rope_buffers_and_rotation_match_reference():
    head_dim, grid = 8, 3
    rope = VisionRotaryEmbeddingFast(head_dim, grid)
    angles = torch.tensor([[ref_rope_angle(i, *divmod(n, grid), head_dim) for i in range(head_dim)]
                           for n in range(grid * grid)], dtype=torch.float64)
    torch.testing.assert_close(rope.freqs_cos.double(), angles.cos(), rtol=0, atol=1e-6)
    x = torch.randn(grid * grid, head_dim)
    torch.testing.assert_close(rope(x).double(), ref_rope(x.double(), grid), rtol=1e-5, atol=1e-5)
    assert set(rope.state_dict()) == {"freqs_cos", "freqs_sin"}   # persistent, as in the official checkpoints


def test_attention_with_rope_matches_naive_float64_loop():
    torch.manual_seed(SEED)
    attn = randomize(Attention(32, 2), std=0.2)
    rope = VisionRotaryEmbeddingFast(16, 3)
    x = torch.randn(2, 9, 32)
    expected = ref_attention(attn, x.double(), 3)
    torch.testing.assert_close(attn(x, rope).double(), expected, rtol=1e-4, atol=1e-5)
    # In float64 only the float32 RoPE tables (as in the official buffers) limit the agreement.
    torch.testing.assert_close(attn.double()(x.double(), rope.double()), expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ whole model
@pytest.mark.parametrize("patch_size,size", [(1, 4), (2, 4)])
def test_sfd_forward_matches_float64_reference(patch_size, size):
    model = randomize(tiny_sfd(patch_size=patch_size, input_size=size)).eval()
    x, (t_tex, t_sem), y = sfd_inputs(size=size)
    out = model(x, (t_tex, t_sem), y)
    assert out.shape == x.shape
    expected = ref_forward(model, x, t_tex, t_sem, y)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    # Swapping the two times must change the output: the semantic and texture embedders are distinct.
    assert not torch.allclose(model(x, (t_sem, t_tex), y), out)


def test_forward_is_deterministic():
    model_a = randomize(tiny_sfd()).eval()
    model_b = randomize(tiny_sfd()).eval()
    x, t, y = sfd_inputs()
    out = model_a(x, t, y)
    assert torch.equal(out, model_a(x, t, y))
    assert torch.equal(out, model_b(x, t, y))


def test_init_follows_spec():
    model = tiny_sfd(input_size=16)
    for block in model.blocks:
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()
        assert torch.equal(block.norm1.weight, torch.ones_like(block.norm1.weight))
        bound = math.sqrt(6 / sum(block.attn.qkv.weight.shape))       # xavier-uniform
        assert block.attn.qkv.weight.abs().max() <= bound and block.attn.qkv.weight.abs().max() > 0.9 * bound
        assert not block.attn.qkv.bias.any()
    assert not model.final_layer.linear.weight.any() and not model.final_layer.adaLN_modulation[-1].weight.any()
    torch.testing.assert_close(model.pos_embed[0].double(), ref_pos_embed(64, 16), rtol=0, atol=1e-7)
    assert not model.pos_embed.requires_grad
    table = model.y_embedder.embedding_table.weight
    assert table.shape[0] == 1001 and abs(table.std().item() - 0.02) < 0.002
    assert abs(model.t_embedder_sem.mlp[0].weight.std().item() - 0.02) < 0.002
    w = model.x_embedder.proj.weight
    assert w.abs().max() <= math.sqrt(6 / (w.shape[0] + w[0].numel()))
    proj = model.repa_projector[0].weight
    assert proj.abs().max() <= math.sqrt(6 / sum(proj.shape)) and not model.repa_projector[0].bias.any()
    # Zero-initialised output layer: the untrained model predicts zero velocity.
    x, t, y = sfd_inputs(size=16)
    assert not model.eval()(x, t, y).any()


@pytest.mark.parametrize("repa_depth", [1, 2])
def test_training_mode_returns_repa_projection_of_the_configured_block(repa_depth):
    model = randomize(tiny_sfd(repa_out_dim=12, repa_depth=repa_depth)).train()
    x, t, y = sfd_inputs()
    captured = {}
    model.blocks[repa_depth - 1].register_forward_hook(lambda m, i, o: captured.setdefault("tokens", o))
    velocity, projection = model(x, t, y, drop_labels=torch.zeros(3, dtype=torch.bool))
    assert velocity.shape == x.shape and projection.shape == (3, 16, 12)
    torch.testing.assert_close(projection, model.repa_projector(captured["tokens"]))
    # Same labels in eval mode give the same velocity (no dropout), without the projection.
    torch.testing.assert_close(model.eval()(x, t, y), velocity)


def test_label_dropout_uses_null_row():
    model = randomize(tiny_sfd(class_dropout_prob=1.0)).train()   # every label dropped
    x, t, y = sfd_inputs()
    velocity, _ = model(x, t, y)
    null = torch.full_like(y, 1000)
    torch.testing.assert_close(velocity, model.eval()(x, t, null))
    model.train()
    forced, _ = model(x, t, y, drop_labels=torch.tensor([True, False, True]))
    expected = model.eval()(x, t, torch.tensor([1000, int(y[1]), 1000]))
    torch.testing.assert_close(forced, expected)
    assert not torch.allclose(forced, velocity)


def test_cfg_scale_one_is_conditional_and_scale_s_combines():
    model = randomize(tiny_sfd()).eval()
    x, t, y = sfd_inputs()
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 1000))
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 3.0), uncond + 3.0 * (cond - uncond),
                               rtol=1e-4, atol=1e-5)


def test_cfg_interval_leaves_early_streams_unguided():
    model = randomize(tiny_sfd()).eval()
    x, _, y = sfd_inputs()
    t_tex, t_sem = torch.tensor([0.0, 0.5, 0.9]), torch.tensor([0.3, 0.8, 1.0])
    cond = model(x, (t_tex, t_sem), y)
    uncond = model(x, (t_tex, t_sem), torch.full_like(y, 1000))
    guided = uncond + 2.0 * (cond - uncond)
    out = model.forward_with_cfg(x, (t_tex, t_sem), y, 2.0, interval_start=0.6)
    tex, sem = slice(0, 32), slice(32, 48)
    torch.testing.assert_close(out[:2, tex], cond[:2, tex], rtol=1e-5, atol=1e-5)   # t_tex 0, 0.5 < 0.6
    torch.testing.assert_close(out[2:, tex], guided[2:, tex], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:1, sem], cond[:1, sem], rtol=1e-5, atol=1e-5)   # t_sem 0.3 < 0.6
    torch.testing.assert_close(out[1:, sem], guided[1:, sem], rtol=1e-4, atol=1e-5)


def test_guided_velocity_separate_scales():
    v_good, v_bad = torch.randn(2, 6, 2, 2), torch.randn(2, 6, 2, 2)
    out = guided_velocity(v_good, v_bad, 1.5, 2.5, semantic_channels=2)
    torch.testing.assert_close(out[:, :4], v_bad[:, :4] + 1.5 * (v_good[:, :4] - v_bad[:, :4]))
    torch.testing.assert_close(out[:, 4:], v_bad[:, 4:] + 2.5 * (v_good[:, 4:] - v_bad[:, 4:]))
    same = guided_velocity(v_good, v_bad, 1.5, semantic_channels=2)
    torch.testing.assert_close(same, v_bad + 1.5 * (v_good - v_bad))


def test_autoguidance_forward_matches_float64_hand_combination():
    from sfd_core.models import autoguidance_velocity

    good = randomize(tiny_sfd(), seed=1)
    weak = randomize(tiny_sfd(), seed=2).eval()
    x, t, y = sfd_inputs()
    with torch.no_grad():
        v_good, v_weak = good.eval()(x, t, y).double(), weak(x, t, y).double()
        expected = torch.cat([v_weak[:, :32] + 1.7 * (v_good[:, :32] - v_weak[:, :32]),
                              v_weak[:, 32:] + 1.2 * (v_good[:, 32:] - v_weak[:, 32:])], dim=1)
        # Train mode on purpose: the guided forward uses no label dropout and returns no REPA tuple.
        out = good.train().forward_with_autoguidance(x, t, y, weak, 1.5, cfg_scale_sem=1.2, cfg_scale_tex=1.7)
        same = good.forward_with_autoguidance(x, t, y, weak, 1.5)
        unguided = good.forward_with_autoguidance(x, t, y, weak, 1.0)
        generic = autoguidance_velocity(good.eval(), weak, x, t, y, 1.7, 1.2)
    tol = dict(rtol=1e-5, atol=1e-5)
    assert (expected - (v_weak + 1.5 * (v_good - v_weak))).abs().max() > 1e-2  # the scales matter
    torch.testing.assert_close(out.double(), expected, **tol)
    torch.testing.assert_close(same.double(), v_weak + 1.5 * (v_good - v_weak), **tol)
    torch.testing.assert_close(generic.double(), expected, **tol)
    torch.testing.assert_close(unguided.double(), v_good, **tol)


def test_plain_lightningdit_has_single_timestep_embedder():
    model = randomize(tiny_sfd(in_channels=32, semantic_channels=0)).eval()
    keys = model.state_dict().keys()
    assert "t_embedder.mlp.0.weight" in keys and not any(k.startswith("t_embedder_") for k in keys)
    x, t, y = sfd_inputs(channels=32)
    torch.testing.assert_close(model(x, t, y), model(x, t[0], y))   # tuple -> t_tex is used


# ----------------------------------------------------------------------------------------- configs and layout
XL_SHAPES = {
    "pos_embed": (1, 256, 1152), "x_embedder.proj.weight": (1152, 48, 1, 1), "x_embedder.proj.bias": (1152,),
    "t_embedder_sem.mlp.0.weight": (576, 256), "t_embedder_sem.mlp.0.bias": (576,),
    "t_embedder_sem.mlp.2.weight": (576, 576), "t_embedder_sem.mlp.2.bias": (576,),
    "t_embedder_tex.mlp.0.weight": (576, 256), "t_embedder_tex.mlp.0.bias": (576,),
    "t_embedder_tex.mlp.2.weight": (576, 576), "t_embedder_tex.mlp.2.bias": (576,),
    "y_embedder.embedding_table.weight": (1001, 1152),
    "feat_rope.freqs_cos": (256, 72), "feat_rope.freqs_sin": (256, 72),
    "final_layer.norm_final.weight": (1152,), "final_layer.linear.weight": (48, 1152),
    "final_layer.linear.bias": (48,), "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    "final_layer.adaLN_modulation.1.bias": (2304,),
    "repa_projector.0.weight": (2048, 1152), "repa_projector.0.bias": (2048,),
    "repa_projector.2.weight": (2048, 2048), "repa_projector.2.bias": (2048,),
    "repa_projector.4.weight": (768, 2048), "repa_projector.4.bias": (768,),
}
XL_BLOCK_SHAPES = {
    "norm1.weight": (1152,), "norm2.weight": (1152,), "attn.qkv.weight": (3456, 1152), "attn.qkv.bias": (3456,),
    "attn.q_norm.weight": (72,), "attn.k_norm.weight": (72,), "attn.proj.weight": (1152, 1152),
    "attn.proj.bias": (1152,), "mlp.w12.weight": (6144, 1152), "mlp.w12.bias": (6144,),
    "mlp.w3.weight": (1152, 3072), "mlp.w3.bias": (1152,), "adaLN_modulation.1.weight": (6912, 1152),
    "adaLN_modulation.1.bias": (6912,),
}


def test_xl_state_dict_keys_and_shapes_equal_spec():
    with torch.device("meta"):
        model = build_model("LightningDiT-XL/1")
    expected = dict(XL_SHAPES)
    for i in range(28):
        expected.update({f"blocks.{i}.{k}": v for k, v in XL_BLOCK_SHAPES.items()})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 417
    assert shapes == expected


@pytest.mark.parametrize("name,keys,params_m", [("LightningDiT-B/1", 193, 137.63), ("LightningDiT-L/1", 361, 465.53),
                                               ("LightningDiT-XL/1", 417, 682.77),
                                               ("LightningDiT-1p0B/1", 361, 1037.19)])
def test_config_key_and_param_counts(name, keys, params_m):
    with torch.device("meta"):
        model = build_model(name)
    assert len(model.state_dict()) == keys
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m


def test_xl_repa_projector_params():
    with torch.device("meta"):
        model = build_model("LightningDiT-XL/1")
    assert round(sum(p.numel() for p in model.repa_projector.parameters()) / 1e6, 2) == 8.13


def test_build_model_rejects_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="LightningDiT-XL/1"):
        build_model("LightningDiT-XXXL/1")
    with pytest.raises(ValueError, match="in_channels"):
        build_model("LightningDiT-tiny/1", in_chans=3)
    assert set(MODEL_CONFIGS) >= {"LightningDiT-B/1", "LightningDiT-L/1", "LightningDiT-XL/1",
                                  "LightningDiT-1p0B/1", "LightningDiT-tiny/1"}
    model = build_model("LightningDiT-tiny/1", input_size=8, in_channels=40, semantic_channels=8, use_repa=False)
    assert model.x_embedder.proj.weight.shape == (64, 40, 1, 1) and not hasattr(model, "repa_projector")


def test_forward_and_cfg_trace_without_graph_breaks():
    """torch.compile-friendliness: one dynamo graph each (no .item(), no data-dependent Python branches)."""
    model = randomize(tiny_sfd())
    x, t, y = sfd_inputs()
    explained = torch._dynamo.explain(model.train())(x, t, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    explained = torch._dynamo.explain(model.eval().forward_with_cfg)(x, t, y, 1.5, 0.2)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# ------------------------------------------------------------------------------------------- channel layouts
@pytest.mark.parametrize("name,in_ch,sem,delta_t,repa", [
    ("lightningdit", 32, 0, 0.0, False), ("repa", 32, 0, 0.0, True), ("redi_pca8", 40, 8, 0.0, True),
    ("redi_pca8_sf", 40, 8, 0.3, True), ("sfd_sync", 48, 16, 0.0, True), ("sfd", 48, 16, 0.3, True)])
def test_named_layouts_build_train_and_sample(name, in_ch, sem, delta_t, repa):
    from sfd_core.models import get_layout, layout
    from sfd_core.sampling import sample
    from sfd_core.transport import LossConfig, sfd_training_loss

    lay = get_layout(name)
    assert (lay.in_channels, lay.semantic_channels, lay.delta_t, lay.use_repa) == (in_ch, sem, delta_t, repa)
    model = randomize(tiny_sfd(**layout(name), repa_out_dim=8))
    assert model.x_embedder.proj.weight.shape[1] == in_ch and model.out_channels == in_ch
    keys = model.state_dict().keys()
    assert ("t_embedder.mlp.0.weight" in keys) == (sem == 0)
    assert ("t_embedder_sem.mlp.0.weight" in keys) == (sem > 0)
    assert any(k.startswith("repa_projector.") for k in keys) == repa
    x, t, y = sfd_inputs(channels=in_ch)
    feats = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(2))
    losses = sfd_training_loss(model.train(), x, y, feats, LossConfig(**lay.loss_overrides()),
                               generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(losses["loss"]) and (losses["repa"] > 0) == repa
    losses["loss"].backward()
    out = sample(model, torch.randn(2, in_ch, 4, 4), y[:2], num_steps=5, method="heun", delta_t=lay.delta_t,
                 semantic_channels=lay.semantic_channels)
    assert out.shape == (2, in_ch, 4, 4) and torch.isfinite(out).all()


def test_plain_xl_layout_matches_lightningdit_param_count_and_unknown_layout_is_named():
    from sfd_core.models import layout
    with torch.device("meta"):
        model = build_model("LightningDiT-XL/1", **layout("lightningdit"))
    # hustvl/LightningDiT docs/log.txt: XL/1 on the 32-channel f16d32 latent has 675.26 M parameters.
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 675.26
    assert len(model.state_dict()) == 417 - 8 + 4 - 6  # one H-wide t_embedder, no REPA projector
    with pytest.raises(ValueError, match="redi_pca8"):
        layout("redi")


# ------------------------------------------------------------------------------------------ residual stream
def _block_input_dtypes(model, x, t, y):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype)) for b in model.blocks]
    try:
        out = model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    return out, set(seen)


def test_low_precision_residual_keeps_the_stream_in_the_autocast_dtype():
    default = randomize(tiny_sfd()).eval()
    low = randomize(tiny_sfd(low_precision_residual=True)).eval()
    x, t, y = sfd_inputs()
    # Without autocast the option changes nothing, bit for bit.
    assert torch.equal(low(x, t, y), default(x, t, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_default, dtypes_default = _block_input_dtypes(default, x, t, y)
        out_low, dtypes_low = _block_input_dtypes(low, x, t, y)
    assert dtypes_default == {torch.float32} and dtypes_low == {torch.bfloat16}
    reference = default(x, t, y).double()
    scale = reference.abs().max()
    # bf16 rounding of the stream: same function within bf16 error, but not the identical computation.
    assert (out_low.double() - reference).abs().max() / scale < 3e-2
    assert not torch.equal(out_low, out_default)
