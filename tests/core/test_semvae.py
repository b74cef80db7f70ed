"""SemVAE: official layout and size, posterior handling, and the loss against float64 hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from sfd_core.semvae import SemVAE, TransformerBlock, semvae_loss

TINY = dict(input_dim=24, hidden_dim=16, depth=2, num_heads=2, latent_channels=4, grid=3)


def tiny_semvae(seed: int = 0) -> SemVAE:
    torch.manual_seed(seed)
    return SemVAE(**TINY)


def test_default_config_matches_official_size_and_keys():
    with torch.device("meta"):
        model = SemVAE()
    encoder = sum(p.numel() for p in model.encoder.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert round(encoder / 1e6, 3) == 28.968 and round(decoder / 1e6, 3) == 28.957
    assert round((encoder + decoder) / 1e6, 1) == 57.9
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["encoder.0.weight"] == (768, 768) and shapes["encoder.6.weight"] == (32, 768)
    assert shapes["encoder.5.weight"] == (768,)                        # final LayerNorm
    assert shapes["decoder.0.weight"] == (768, 16) and shapes["decoder.6.weight"] == (768, 768)
    assert shapes["encoder.4.attn.in_proj_weight"] == (2304, 768)
    assert shapes["decoder.1.mlp.0.weight"] == (3072, 768) and shapes["decoder.1.mlp.2.weight"] == (768, 3072)
    assert {"encoder.1.norm1.bias", "encoder.1.norm2.weight", "encoder.1.attn.out_proj.bias"} <= set(shapes)
    assert not any("pos" in k for k in shapes)                         # no positional embedding


def test_transformer_block_matches_float64_prenorm_reference():
    torch.manual_seed(0)
    block = TransformerBlock(8, 2)
    x = torch.randn(2, 5, 8)
    sd = {k: v.double() for k, v in block.state_dict().items()}
    xd = x.double()

    def layer_norm(a, prefix):
        mu = a.mean(-1, keepdim=True)
        var = ((a - mu) ** 2).mean(-1, keepdim=True)
        return (a - mu) / torch.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    h = layer_norm(xd, "norm1")
    qkv = h @ sd["attn.in_proj_weight"].T + sd["attn.in_proj_bias"]
    q, k, v = qkv.split(8, dim=-1)
    heads = []
    for i in range(2):
        hs = slice(4 * i, 4 * i + 4)
        weights = torch.softmax(q[..., hs] @ k[..., hs].transpose(1, 2) / 2.0, dim=-1)
        heads.append(weights @ v[..., hs])
    xd = xd + torch.cat(heads, -1) @ sd["attn.out_proj.weight"].T + sd["attn.out_proj.bias"]
    m = layer_norm(xd, "norm2") @ sd["mlp.0.weight"].T + sd["mlp.0.bias"]
    m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))                  # exact GELU
    expected = xd + m @ sd["mlp.2.weight"].T + sd["mlp.2.bias"]
    torch.testing.assert_close(block(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_encode_layout_sampling_and_decode_shapes():
    model = tiny_semvae().eval()
    features = torch.randn(2, 9, 24)
    moments = model.encoder(features)                                  # [B, N, 2C]
    mean, logvar = model.encode_posterior(features)
    assert mean.shape == logvar.shape == (2, 4, 3, 3)
    for h in range(3):
        for w in range(3):                                             # token h*grid+w -> grid cell (h, w)
            torch.testing.assert_close(mean[:, :, h, w], moments[:, h * 3 + w, :4])
            torch.testing.assert_close(logvar[:, :, h, w], moments[:, h * 3 + w, 4:])
    torch.testing.assert_close(model.encode(features, sample=False), mean)
    sample = model.encode(features, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, mean + torch.exp(0.5 * logvar) * noise)
    assert torch.equal(sample, model.encode(features, generator=torch.Generator().manual_seed(7)))
    decoded = model.decode(sample)
    assert decoded.shape == (2, 9, 24)
    torch.testing.assert_close(decoded, model.decoder(sample.flatten(2).transpose(1, 2)))
    with pytest.raises(ValueError, match="tokens"):
        model.encode(torch.randn(1, 10, 24))


def test_logvar_is_clamped():
    model = tiny_semvae()
    with torch.no_grad():
        model.encoder[-1].bias[4:] = 1e4                               # logvar channels huge
        model.encoder[-1].bias[4:6] = -1e4                             # ... and two huge negative
    _, logvar = model.encode_posterior(torch.randn(1, 9, 24))
    assert logvar[:, :2].eq(-30.0).all() and logvar[:, 2:].eq(20.0).all()


def ref_loss(recon, target, mean, logvar, cos_mode, kl_weight=1e-7, mse_weight=1.0, cos_weight=1.0):
    r, f = recon.double(), target.double()
    b, n, d = r.shape
    mse = ((r - f) ** 2).sum() / (b * n * d)
    cosines = []
    if cos_mode == "token_axis":                                       # one cosine per (sample, feature channel)
        for bi in range(b):
            for di in range(d):
                u, v = r[bi, :, di], f[bi, :, di]
                cosines.append((u * v).sum() / max(u.norm() * v.norm(), 1e-8))
    else:                                                              # one cosine per (sample, token)
        for bi in range(b):
            for ni in range(n):
                u, v = r[bi, ni], f[bi, ni]
                cosines.append((u * v).sum() / max(u.norm() * v.norm(), 1e-8))
    cos = 1 - torch.stack(cosines).mean()
    mu, lv = mean.double(), logvar.double()
    kl = sum(0.5 * (mu[bi] ** 2 + lv[bi].exp() - 1 - lv[bi]).sum() for bi in range(b)) / b
    return {"loss": mse_weight * mse + cos_weight * cos + kl_weight * kl, "mse": mse, "cos": cos, "kl": kl}


@pytest.mark.parametrize("cos_mode", ["token_axis", "per_token"])
def test_loss_matches_float64_hand_computation(cos_mode):
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(2, 9, 24, generator=gen)
    recon = target + 0.5 * torch.randn(2, 9, 24, generator=gen)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    got = semvae_loss(recon, target, mean, logvar, cos_mode=cos_mode)
    expected = ref_loss(recon, target, mean, logvar, cos_mode)
    for name in ("loss", "mse", "cos", "kl"):
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-5, atol=1e-6)
    weighted = semvae_loss(recon, target, mean, logvar, cos_mode=cos_mode, kl_weight=0.1, mse_weight=2.0,
                           cos_weight=0.5)
    expected_w = ref_loss(recon, target, mean, logvar, cos_mode, kl_weight=0.1, mse_weight=2.0, cos_weight=0.5)
    torch.testing.assert_close(weighted["loss"].double(), expected_w["loss"], rtol=1e-5, atol=1e-6)


def test_cos_modes_differ_and_default_is_official_token_axis():
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(2, 9, 24, generator=gen)
    recon = target + torch.randn(2, 9, 24, generator=gen)
    zeros = torch.zeros(2, 4, 3, 3)
    default = semvae_loss(recon, target, zeros, zeros)["cos"]
    assert torch.equal(default, semvae_loss(recon, target, zeros, zeros, cos_mode="token_axis")["cos"])
    assert not torch.allclose(default, semvae_loss(recon, target, zeros, zeros, cos_mode="per_token")["cos"])
    with pytest.raises(ValueError):
        semvae_loss(recon, target, zeros, zeros, cos_mode="dim2")


def test_training_pass_backpropagates_to_both_halves():
    model = tiny_semvae().train()
    features = torch.randn(2, 9, 24)
    recon, mean, logvar = model(features, generator=torch.Generator().manual_seed(0))
    semvae_loss(recon, features, mean, logvar)["loss"].backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0 and model.decoder[0].weight.grad.abs().sum() > 0
