"""Stand-ins are real-format files that the real loaders accept, deterministic in the seed, and reused."""
from __future__ import annotations

import json

import pytest
import torch

from sfd_core.config import ConfigError
from sfd_core.encoders import build_inception, load_dinov2, load_texture_vae, resolve_inception_weights
from sfd_core.standins import MANIFEST, make_standins

RES = 32  # 2x2 latent grid: the smallest the f16 layout allows with room for attention


def _tensors(specs) -> dict[str, torch.Tensor]:
    """Every tensor of every stand-in, read back through plain torch/safetensors (not the loaders)."""
    from safetensors.torch import load_file

    out = {}
    for k, v in torch.load(specs["texture_vae"]["path"], weights_only=True)["state_dict"].items():
        out["vae." + k] = v
    for k, v in load_file(f"{specs['texture_vae_f8']['path']}/diffusion_pytorch_model.safetensors").items():
        out["vae8." + k] = v
    for k, v in load_file(specs["dinov2"]["path"]).items():
        out["dino." + k] = v
    for k, v in torch.load(specs["inception"], weights_only=True).items():
        out["inception." + k] = v
    for k, v in torch.load(specs["semvae_official"], weights_only=True)["model_state_dict"].items():
        out["semvae." + k] = v
    return out


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    directory = tmp_path_factory.mktemp("standins")
    rng_before = torch.get_rng_state()
    specs = make_standins(directory, seed=0, resolution=RES)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is not consumed
    return directory, specs


def test_standins_load_through_the_real_loaders(standins):
    directory, specs = standins
    assert json.loads(json.dumps(specs)) == specs  # specs go into stage configs as JSON
    x = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1

    ckpt = torch.load(specs["texture_vae"]["path"], weights_only=True)
    assert any(k.startswith("loss.") for k in ckpt["state_dict"])  # like a real LDM checkpoint
    assert "encoder.down.4.attn.0.q.weight" in ckpt["state_dict"]
    vae = load_texture_vae(specs["texture_vae"])
    z = vae.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 8, RES // 16, RES // 16) and (vae.downsample, vae.scaling_factor) == (16, 1.0)
    assert vae.decode_to_uint8(z).shape == (2, RES, RES, 3)

    vae8 = load_texture_vae(specs["texture_vae_f8"])
    assert vae8.encode(x).shape == (2, 4, RES // 8, RES // 8) and vae8.scaling_factor == 0.18215

    dino = load_dinov2(specs["dinov2"])
    feats = dino.features_from_adm(x)
    assert feats.shape == (2, 64, RES // 16, RES // 16) and dino.grid == RES // 16
    assert feats[0, :, 0, 0].sub(feats[0, :, 1, 1]).abs().max() > 0.1  # positions are not collapsed

    inception = build_inception(resolve_inception_weights(specs["inception"]))
    (pool,) = inception(((x + 1) * 127.5).to(torch.uint8))
    assert pool.shape == (2, 2048) and (pool[0] - pool[1]).abs().mean() > 0.01 * pool.abs().mean()


def test_official_semvae_standin_loads_with_the_semvae_loader(standins):
    from sfd_core.semvae import load_semvae

    _, specs = standins
    semvae = load_semvae(specs["semvae_official"], grid=RES // 16)
    assert semvae.config["num_heads"] == 2 and semvae.config["input_dim"] == 64
    tokens = torch.randn(2, (RES // 16) ** 2, 64, generator=torch.Generator().manual_seed(0))
    assert semvae.encode(tokens, sample=False).shape == (2, 16, RES // 16, RES // 16)


def test_standins_are_deterministic_in_the_seed_and_reused(standins, tmp_path):
    directory, specs = standins
    reference = _tensors(specs)

    other = make_standins(tmp_path, seed=1, resolution=RES)
    changed = _tensors(other)
    assert set(changed) == set(reference)
    differing = {k for k in reference if not torch.equal(reference[k], changed[k])}
    assert {k.split(".")[0] for k in differing} == {"vae", "vae8", "dino", "inception", "semvae"}

    again = make_standins(tmp_path, seed=0, resolution=RES)  # manifest says seed 1: rebuilt, same as seed 0
    rebuilt = _tensors(again)
    assert all(torch.equal(v, rebuilt[k]) for k, v in reference.items())
    assert json.loads((tmp_path / MANIFEST).read_text())["seed"] == 0
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # temp files were renamed away

    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert make_standins(tmp_path, seed=0, resolution=RES) == again
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps  # nothing rewritten

    (tmp_path / "dinov2_reg4_tiny.safetensors").unlink()  # a lost file invalidates the manifest's promise
    restored = _tensors(make_standins(tmp_path, seed=0, resolution=RES))
    assert all(torch.equal(v, restored[k]) for k, v in reference.items())


def test_bad_resolution_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="multiple of 16"):
        make_standins(tmp_path, resolution=40)
    assert not (tmp_path / MANIFEST).exists()
