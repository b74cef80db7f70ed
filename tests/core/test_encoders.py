"""Encoders load the real on-disk formats and compute what the official code computes.

References are independent of the code under test: an LDM autoencoder written functionally in float64 straight
from the LDM state dict, a hand-enumerated inverse key map, a float64 ViT forward, a float64 bicubic kernel.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sfd_core.encoders import (WeightsNotFoundError, build_inception, images_to_uint8, load_dinov2,
                               load_texture_vae, preprocess_from_adm, preprocess_semvae_train,
                               resolve_inception_weights, resolve_weights)
from sfd_core.encoders.ldm_vae_keys import UnmappedKeyError, convert_diffusers_to_ldm_state_dict
from sfd_core.encoders.texture_vae import ldm_autoencoder_config

TINY_LDM = {"block_out_channels": [8, 8, 16, 16, 16], "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": 4, "sample_size": 32}
LEVELS = len(TINY_LDM["block_out_channels"])
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _perturb_all_(model: torch.nn.Module, seed: int) -> None:
    # Default init gives every GroupNorm weight=1/bias=0: swapped norms would go unnoticed. Make all tensors distinct.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _random_ldm_diffusers(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**ldm_autoencoder_config(TINY_LDM)).eval()
    _perturb_all_(model, seed + 100)
    return model


# ---------------------------------------------------------------- hand-written inverse key map (diffusers -> LDM)
def _reference_module_pairs(levels: int, layers: int) -> dict[str, str]:
    """diffusers module path -> LDM module path, enumerated from the layout in SPEC §2.1."""
    pairs = {}
    for side, ldm_level, blocks, per_level in (("encoder", "down", "down_blocks", layers),
                                               ("decoder", "up", "up_blocks", layers + 1)):
        for i in range(levels):
            d = f"{side}.{blocks}.{i if side == 'encoder' else levels - 1 - i}"
            for j in range(per_level):
                pairs[f"{d}.resnets.{j}"] = f"{side}.{ldm_level}.{i}.block.{j}"
                pairs[f"{d}.attentions.{j}"] = f"{side}.{ldm_level}.{i}.attn.{j}"
            pairs[f"{d}.downsamplers.0.conv"] = f"{side}.down.{i}.downsample.conv"
            pairs[f"{d}.upsamplers.0.conv"] = f"{side}.up.{i}.upsample.conv"
        pairs[f"{side}.mid_block.resnets.0"] = f"{side}.mid.block_1"
        pairs[f"{side}.mid_block.resnets.1"] = f"{side}.mid.block_2"
        pairs[f"{side}.mid_block.attentions.0"] = f"{side}.mid.attn_1"
        pairs[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        for same in ("conv_in", "conv_out"):
            pairs[f"{side}.{same}"] = f"{side}.{same}"
    pairs["quant_conv"], pairs["post_quant_conv"] = "quant_conv", "post_quant_conv"
    return pairs


_LEAF = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
         "to_out.0": "proj_out"}


def reference_to_ldm(diffusers_state: dict, levels: int, layers: int) -> dict:
    pairs = _reference_module_pairs(levels, layers)
    out = {}
    for key, value in diffusers_state.items():
        module = max((m for m in pairs if key.startswith(m + ".")), key=len)
        rest = key[len(module) + 1:]  # "weight", or "conv1.weight" inside a block
        leaf = rest.rsplit(".", 1)[0] if "." in rest else None
        rest = rest if leaf is None else f"{_LEAF.get(leaf, leaf)}.{rest.rsplit('.', 1)[1]}"
        out[f"{pairs[module]}.{rest}"] = (
            value[:, :, None, None] if ".attentions." in key and value.ndim == 2 else value)
    return out


# ---------------------------------------------------------------- float64 LDM autoencoder (functional reference)
def _gn(x, sd, p, groups):
    return F.group_norm(x, groups, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(x, sd, p, **kw):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def _resnet(x, sd, p, g):
    h = _conv(F.silu(_gn(x, sd, p + ".norm1", g)), sd, p + ".conv1", padding=1)
    h = _conv(F.silu(_gn(h, sd, p + ".norm2", g)), sd, p + ".conv2", padding=1)
    return (_conv(x, sd, p + ".nin_shortcut") if p + ".nin_shortcut.weight" in sd else x) + h


def _attn(x, sd, p, g):
    h = _gn(x, sd, p + ".norm", g)
    b, c, hh, ww = h.shape
    q, k, v = (_conv(h, sd, f"{p}.{n}").reshape(b, c, hh * ww) for n in "qkv")
    w = torch.softmax(q.transpose(1, 2) @ k * c ** -0.5, dim=2)  # [b, query, key]
    return x + _conv((v @ w.transpose(1, 2)).reshape(b, c, hh, ww), sd, p + ".proj_out")


def _mid(h, sd, side, g):
    h = _resnet(h, sd, f"{side}.mid.block_1", g)
    h = _attn(h, sd, f"{side}.mid.attn_1", g)
    return _resnet(h, sd, f"{side}.mid.block_2", g)


def ldm_encode_mean(x, sd, g):
    h = _conv(x, sd, "encoder.conv_in", padding=1)
    for i in range(LEVELS):
        for j in range(TINY_LDM["layers_per_block"]):
            h = _resnet(h, sd, f"encoder.down.{i}.block.{j}", g)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"encoder.down.{i}.attn.{j}", g)
        if i != LEVELS - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2)
    h = _mid(h, sd, "encoder", g)
    h = _conv(F.silu(_gn(h, sd, "encoder.norm_out", g)), sd, "encoder.conv_out", padding=1)
    return _conv(h, sd, "quant_conv")[:, :TINY_LDM["latent_channels"]]


def ldm_decode(z, sd, g):
    h = _conv(_conv(z, sd, "post_quant_conv"), sd, "decoder.conv_in", padding=1)
    h = _mid(h, sd, "decoder", g)
    for i in reversed(range(LEVELS)):
        for j in range(TINY_LDM["layers_per_block"] + 1):
            h = _resnet(h, sd, f"decoder.up.{i}.block.{j}", g)
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"decoder.up.{i}.attn.{j}", g)
        if i != 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = _conv(h, sd, f"decoder.up.{i}.upsample.conv", padding=1)
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out", g)), sd, "decoder.conv_out", padding=1)


@pytest.fixture(scope="module")
def ldm_checkpoint(tmp_path_factory):
    model = _random_ldm_diffusers()
    ldm = reference_to_ldm(model.state_dict(), LEVELS, TINY_LDM["layers_per_block"])
    ldm["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # training-only: must be dropped
    path = tmp_path_factory.mktemp("ldm") / "vae.ckpt"
    torch.save({"state_dict": ldm, "global_step": 7}, path)
    return model, ldm, path


def test_ldm_checkpoint_matches_float64_ldm_reference(ldm_checkpoint):
    model, ldm, path = ldm_checkpoint
    vae = load_texture_vae({"kind": "ldm_f16d32", "path": str(path), "arch": TINY_LDM})
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (4, 16, 1.0)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    sd64 = {k: v.double() for k, v in ldm.items()}
    g = TINY_LDM["norm_num_groups"]

    mean = vae.encode(x.float(), sample=False)
    ref_mean = ldm_encode_mean(x, sd64, g)
    assert mean.shape == (2, 4, 2, 2)
    torch.testing.assert_close(mean.double(), ref_mean, atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # and the loaded model is the original diffusers model, weight for weight
        torch.testing.assert_close(mean, model.encode(x.float()).latent_dist.mean, atol=1e-6, rtol=0)

    img = vae.decode(mean)
    torch.testing.assert_close(img.double(), ldm_decode(mean.double(), sd64, g), atol=2e-5, rtol=1e-4)


def test_every_ldm_key_maps_and_inverse_agrees(ldm_checkpoint):
    model, ldm, _ = ldm_checkpoint
    exported = convert_diffusers_to_ldm_state_dict(model.state_dict(), LEVELS)
    assert set(exported) == set(ldm) - {"loss.discriminator.main.0.weight"}
    assert all(torch.equal(exported[k], ldm[k]) for k in exported)
    # Attention lives only in the deepest level: layers_per_block in the encoder, one more in the decoder.
    assert {k.split(".attn.")[0] for k in ldm if ".attn." in k} == {"encoder.down.4", "decoder.up.4"}
    assert "decoder.up.4.attn.1.q.weight" in ldm and ldm["encoder.down.4.attn.0.q.weight"].ndim == 4


def test_ldm_loader_is_strict(ldm_checkpoint, tmp_path):
    _, ldm, _ = ldm_checkpoint
    extra = dict(ldm, **{"encoder.down.0.block.0.extra.weight": torch.zeros(1)})
    torch.save({"state_dict": extra}, tmp_path / "extra.ckpt")
    with pytest.raises(UnmappedKeyError, match="extra"):
        load_texture_vae({"kind": "ldm_f16d32", "path": str(tmp_path / "extra.ckpt"), "arch": TINY_LDM})
    missing = {k: v for k, v in ldm.items() if k != "decoder.up.4.attn.1.k.bias"}
    torch.save({"state_dict": missing}, tmp_path / "missing.ckpt")
    with pytest.raises(RuntimeError, match="to_k.bias"):
        load_texture_vae({"kind": "ldm_f16d32", "path": str(tmp_path / "missing.ckpt"), "arch": TINY_LDM})


def test_default_arch_is_the_sfd_f16d32_vae():
    from diffusers import AutoencoderKL

    with torch.device("meta"):  # shapes only, no memory or init cost
        model = AutoencoderKL(**ldm_autoencoder_config())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # SPEC §2.1: 69.84 M parameters, encoder 28.41 M, decoder 41.42 M; 2 encoder / 3 decoder attention blocks.
    assert round(count(model) / 1e6, 2) == 69.84
    assert (round(count(model.encoder) / 1e6, 2), round(count(model.decoder) / 1e6, 2)) == (28.41, 41.42)
    ldm = reference_to_ldm(model.state_dict(), 5, 2)
    assert {k for k in ldm if k.endswith(".q.weight")} == {
        "encoder.down.4.attn.0.q.weight", "encoder.down.4.attn.1.q.weight", "encoder.mid.attn_1.q.weight",
        "decoder.mid.attn_1.q.weight", *(f"decoder.up.4.attn.{j}.q.weight" for j in range(3))}


def test_posterior_sampling_is_mean_plus_std_eps_and_reproducible(ldm_checkpoint):
    model, _, path = ldm_checkpoint
    vae = load_texture_vae({"kind": "ldm_f16d32", "path": str(path), "arch": TINY_LDM})
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z1 = vae.encode(x, generator=torch.Generator().manual_seed(5))
    z2 = vae.encode(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(z1, z2)
    with torch.no_grad():
        dist = model.encode(x).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z1, dist.mean + dist.std * eps, atol=1e-6, rtol=0)
    assert not torch.allclose(z1, vae.encode(x, generator=torch.Generator().manual_seed(6)))


def test_diffusers_f8_folder_round_trip(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
                          norm_num_groups=4, sample_size=32, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4).eval()
    _perturb_all_(model, 1)
    model.save_pretrained(tmp_path / "pipe" / "vae")  # pipeline layout: the VAE sits in vae/
    assert json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215
    vae = load_texture_vae({"kind": "diffusers", "path": str(tmp_path / "pipe")})
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (4, 8, 0.18215)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = vae.encode(x, sample=False)
    with torch.no_grad():
        mean = model.encode(x).latent_dist.mean
        torch.testing.assert_close(z, 0.18215 * mean, atol=1e-6, rtol=0)  # scaled on the way in ...
        torch.testing.assert_close(vae.decode(z), model.decode(mean).sample, atol=1e-5, rtol=0)  # ... and out


def test_images_to_uint8_truncates_after_plus_128():
    # 127.5 x + 128, truncated: -1 -> 0.5 -> 0; -0.999 -> 0.63 -> 0; -0.996 -> 1.01 -> 1; 0 -> 128;
    # 0.5 -> 191.75 -> 191 (rounding would give 192); 1 -> 255.5 -> 255; out of range clamps.
    x = torch.tensor([-2.0, -1.0, -0.999, -0.996, 0.0, 0.5, (200.9 - 128) / 127.5, 1.0, 3.0])
    expect = [0, 0, 0, 1, 128, 191, 200, 255, 255]
    got = images_to_uint8(x.view(1, 1, 1, -1).expand(1, 3, 1, -1))
    assert got.dtype == torch.uint8 and got.shape == (1, 1, 9, 3)  # NHWC
    assert got[0, 0, :, 0].tolist() == expect
    chw = torch.tensor([[[[0.0]]], [[[1.0]]], [[[-1.0]]]]).view(1, 3, 1, 1)
    assert images_to_uint8(chw)[0, 0, 0].tolist() == [128, 255, 0]  # channel order kept


def test_decode_to_uint8_is_decode_then_quantize(ldm_checkpoint):
    _, _, path = ldm_checkpoint
    vae = load_texture_vae({"kind": "ldm_f16d32", "path": str(path), "arch": TINY_LDM})
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    img = vae.decode(z)
    assert torch.equal(vae.decode_to_uint8(z), (127.5 * img + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))


# ---------------------------------------------------------------- weights resolution
def _fake_hf_cache(root, repo, files: dict[str, bytes]):
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (base / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "snapshots" / commit / name).write_bytes(data)
    return base / "snapshots" / commit


def test_resolve_weights_order_and_cache(tmp_path):
    snapshot = _fake_hf_cache(tmp_path / "hub", "org/vae", {"w.ckpt": b"x", "config.json": b"{}"})
    local = tmp_path / "mine.ckpt"
    local.write_bytes(b"y")
    kw = dict(hf_repo="org/vae", cache_dir=tmp_path / "hub")
    assert resolve_weights("vae", local_path=local, hf_filename="w.ckpt", **kw) == str(local)
    assert resolve_weights("vae", hf_filename="w.ckpt", **kw) == str(snapshot / "w.ckpt")
    assert resolve_weights("vae", hf_filename=None, **kw) == str(snapshot)  # whole folder


def test_resolve_weights_errors_name_file_place_and_field(tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights("texture_vae", hf_repo="org/none", hf_filename="ldm-f16d32.ckpt",
                        config_field="pretrained.texture_vae.path", cache_dir=tmp_path)
    msg = str(err.value)
    assert "ldm-f16d32.ckpt" in msg and "pretrained.texture_vae.path" in msg and "org/none" in msg
    assert "downloads not allowed" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # even when downloads are allowed, offline means no hub call
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_weights("dinov2", hf_repo="org/none", hf_filename="m.safetensors", allow_download=True,
                        cache_dir=tmp_path)
    # A wrong explicit path is an error, never a silent fall-back to a cached copy.
    _fake_hf_cache(tmp_path / "hub", "org/vae", {"w.ckpt": b"x"})
    with pytest.raises(WeightsNotFoundError, match=r"dinov2\.path.*nope\.pth"):
        resolve_weights("dinov2", local_path=tmp_path / "nope.pth", hf_repo="org/vae", hf_filename="w.ckpt",
                        cache_dir=tmp_path / "hub")


# ---------------------------------------------------------------- DINOv2
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=28,
                            **TINY_VIT).eval()
    _perturb_all_(vit, 1)
    with torch.no_grad():  # make the prefix tokens and layer scales matter
        for name, p in vit.named_parameters():
            if name.endswith("gamma") or name in ("cls_token", "reg_token"):
                p.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("dino") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    spec = {"path": str(path), "img_size": 28, "arch": TINY_VIT}
    return vit, spec


def vit_patch_tokens_float64(x, sd, heads):
    """DINOv2-reg forward written out: [cls, 4 registers, patches], pos-embed on patches only, pre-norm blocks."""
    sd = {k: v.double() for k, v in sd.items()}
    b = x.shape[0]
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    patches = patches.flatten(2).transpose(1, 2) + sd["pos_embed"]
    h = torch.cat([sd["cls_token"].expand(b, -1, -1), sd["reg_token"].expand(b, -1, -1), patches], dim=1)
    d = h.shape[-1]
    ln = lambda t, p: F.layer_norm(t, (d,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(TINY_VIT["depth"]):
        p = f"blocks.{i}"
        q, k, v = F.linear(ln(h, p + ".norm1"), sd[p + ".attn.qkv.weight"], sd[p + ".attn.qkv.bias"]).chunk(3, -1)
        split = lambda t: t.reshape(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), -1) @ split(v)
        att = F.linear(att.transpose(1, 2).reshape(b, -1, d), sd[p + ".attn.proj.weight"], sd[p + ".attn.proj.bias"])
        h = h + sd[p + ".ls1.gamma"] * att
        m = F.gelu(F.linear(ln(h, p + ".norm2"), sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"]))
        h = h + sd[p + ".ls2.gamma"] * F.linear(m, sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])
    return ln(h, "norm")[:, 5:]


def test_patch_tokens_drop_cls_and_four_registers(tiny_vit):
    vit, spec = tiny_vit
    enc = load_dinov2(spec)
    assert (enc.embed_dim, enc.grid, enc.num_prefix_tokens, enc.img_size) == (32, 2, 5, 28)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    tokens = enc.patch_tokens(x)
    assert tokens.shape == (2, 4, 32)
    with torch.no_grad():
        assert torch.equal(tokens, vit.forward_features(x)[:, 5:])
    ref = vit_patch_tokens_float64(x.double(), vit.state_dict(), TINY_VIT["num_heads"])
    torch.testing.assert_close(tokens.double(), ref, atol=1e-5, rtol=1e-5)


def test_meta_format_pth_loads_like_timm(tiny_vit, tmp_path):
    vit, spec = tiny_vit
    timm_sd = vit.state_dict()
    # Meta layout (facebookresearch/dinov2): cls position embedded in pos_embed, registers as register_tokens.
    cls_pos = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(9))
    meta = {k: v for k, v in timm_sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    meta.update(cls_token=timm_sd["cls_token"] - cls_pos, pos_embed=torch.cat([cls_pos, timm_sd["pos_embed"]], 1),
                register_tokens=timm_sd["reg_token"], mask_token=torch.zeros(1, 32))
    torch.save(meta, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    enc = load_dinov2(dict(spec, path=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth")))
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(enc.patch_tokens(x), vit.forward_features(x)[:, 5:], atol=1e-5, rtol=1e-5)


def test_features_from_adm_are_tokens_on_a_row_major_grid(tiny_vit):
    _, spec = tiny_vit
    enc = load_dinov2(spec)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = enc.features_from_adm(x)
    tokens = enc.patch_tokens(preprocess_from_adm(x, 28))
    assert feats.shape == (2, 32, 2, 2)
    for h in range(2):
        for w in range(2):
            assert torch.equal(feats[:, :, h, w], tokens[:, h * 2 + w])


def _cubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Keys cubic (a = -0.75), half-pixel centres, edge-clamped taps, no antialiasing: PyTorch's bicubic."""
    def k(t):
        t = abs(t)
        return (1.25 * t - 2.25) * t * t + 1 if t <= 1 else ((-0.75 * t + 3.75) * t - 6) * t + 3 if t < 2 else 0.0
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            m[i, min(max(tap, 0), n_in - 1)] += k(src - tap)
    return m


def test_preprocess_from_adm_matches_hand_computation():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    got = preprocess_from_adm(x, size=14)  # a downscale (like 256 -> 224), where antialiasing would differ
    normalized = ((x[0].numpy() + 1) / 2 - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    r = _cubic_resize_matrix(16, 14)
    expect = np.einsum("ih,chw,jw->cij", r, normalized, r)
    np.testing.assert_allclose(got[0].numpy(), expect, atol=1e-10)


def test_preprocess_semvae_train_matches_hand_computation():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (260, 300, 3), dtype=np.uint8))  # H 260, W 300
    got = preprocess_semvae_train(img, size=224)
    resized = img.resize((int(256 * 300 / 260), 256), Image.BICUBIC)  # short side -> 256
    left, top = round((resized.width - 224) / 2), round((256 - 224) / 2)
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float64) / 255.0
    expect = ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    assert got.shape == (3, 224, 224)
    np.testing.assert_allclose(got.numpy(), expect, atol=1e-5)


# ---------------------------------------------------------------- Inception
def test_inception_weights_are_checked_and_errors_say_where(tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_inception_weights(tmp_path / "missing.pth", config_field="fid.inception_weights")
    assert "weights-inception-2015-12-05-6726825d.pth" in str(err.value)
    assert "fid.inception_weights" in str(err.value) and "hub/checkpoints" in str(err.value)
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not a torch-fidelity InceptionV3"):
        resolve_inception_weights(tmp_path / "wrong.pth")


def test_random_inception_builds_offline_and_is_not_collapsed(tmp_path):
    from sfd_core.encoders import random_inception_state_dict

    torch.save(random_inception_state_dict(seed=0), tmp_path / "inception.pth")
    net = build_inception(resolve_inception_weights(tmp_path / "inception.pth"), features=("2048",))
    imgs = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    imgs[1] = imgs[1] // 4  # a darker image must give different features
    (feats,) = net(imgs)
    assert feats.shape == (2, 2048)
    assert (feats[0] - feats[1]).abs().mean() > 0.05 * feats.abs().mean()
