"""Weights I/O: official SFD/SemVAE checkpoint layouts, safetensors with metadata, fsspec URLs, clear errors."""
from __future__ import annotations

import argparse

import pytest
import torch

from sfd_core.checkpoints import (CheckpointError, load_state_dict, load_weights, read_weights_metadata,
                                  save_weights)
from sfd_core.models import build_model
from sfd_core.semvae import SemVAE, load_semvae, save_semvae


def tiny(seed: int):
    torch.manual_seed(seed)
    return build_model("LightningDiT-tiny/1", input_size=4).eval()


def randomized(seed: int):
    model = tiny(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def prefixed(state_dict, prefix="module."):
    return {prefix + k: v for k, v in state_dict.items()}


def test_official_ema_only_state_dict(tmp_path):
    source = randomized(1)
    torch.save(source.state_dict(), tmp_path / "4000000.pt")
    assert_same_weights(load_weights(tiny(0), str(tmp_path / "4000000.pt")), source)
    # Same file with DDP/accelerate wrapping (double) prefixes.
    torch.save(prefixed(prefixed(source.state_dict())), tmp_path / "wrapped.pt")
    assert_same_weights(load_weights(tiny(0), str(tmp_path / "wrapped.pt")), source)


def test_official_training_checkpoint_prefers_ema(tmp_path):
    ema, raw = randomized(1), randomized(2)
    opt = torch.optim.AdamW(raw.parameters())
    raw.train()
    raw(torch.randn(1, 48, 4, 4), (torch.rand(1), torch.rand(1)), torch.tensor([3]))[0].sum().backward()
    opt.step()
    raw.eval()
    checkpoint = {"model": prefixed(raw.state_dict()), "ema": ema.state_dict(), "opt": opt.state_dict(),
                  # A non-tensor config object, like the pickled OmegaConf of the official train.py.
                  "config": argparse.Namespace(model="LightningDiT-XL/1")}
    torch.save(checkpoint, tmp_path / "0400000.pt")
    assert_same_weights(load_weights(tiny(0), str(tmp_path / "0400000.pt")), ema)
    assert_same_weights(load_weights(tiny(0), str(tmp_path / "0400000.pt"), key="model"), raw)


def test_safetensors_round_trip_with_metadata_local_and_fsspec(tmp_path):
    source = randomized(3)
    path = tmp_path / "weights" / "ema.safetensors"
    save_weights(source, str(path), metadata={"step": 1200, "model": "LightningDiT-tiny/1"})
    assert_same_weights(load_weights(tiny(0), str(path)), source)
    assert read_weights_metadata(str(path)) == {"step": "1200", "model": "LightningDiT-tiny/1"}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    url = "memory://ckpts/ema.safetensors"
    save_weights(source.state_dict(), url)
    assert_same_weights(load_weights(tiny(0), url), source)
    # An official .pt read through fsspec as well.
    with __import__("fsspec").open("memory://ckpts/ema.pt", "wb") as f:
        torch.save(source.state_dict(), f)
    assert_same_weights(load_weights(tiny(0), "memory://ckpts/ema.pt"), source)


def test_s3_weights_use_the_project_endpoint_settings(moto_s3, monkeypatch, tmp_path):
    """s3:// goes through storage.fs, so the endpoint/credentials come from SFD_S3_ENDPOINT_URL etc.; plain
    fsspec (no endpoint) would try AWS itself and fail."""
    from storage import fs

    moto_s3.apply_env(monkeypatch)
    fs.clear_filesystem_cache()
    source = randomized(6)
    root = moto_s3.fresh_url()
    save_weights(source, fs.join(root, "ema.safetensors"), metadata={"step": 7})
    assert fs.exists(fs.join(root, "ema.safetensors"))
    assert_same_weights(load_weights(tiny(0), fs.join(root, "ema.safetensors")), source)
    assert read_weights_metadata(fs.join(root, "ema.safetensors")) == {"step": "7"}
    # An official full training checkpoint (.pt with a pickled config) uploaded with boto3 directly.
    torch.save({"ema": prefixed(source.state_dict()), "config": argparse.Namespace(x=1)}, tmp_path / "ckpt.pt")
    key = fs.join(root, "0400000.pt").split(f"s3://{moto_s3.bucket}/", 1)[1]
    moto_s3.client().put_object(Bucket=moto_s3.bucket, Key=key, Body=(tmp_path / "ckpt.pt").read_bytes())
    assert_same_weights(load_weights(tiny(0), fs.join(root, "0400000.pt")), source)


def test_local_files_and_file_urls_load_in_place(tmp_path):
    source = randomized(7)
    save_weights(source, str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "w.pt")
    for path in (str(tmp_path / "w.safetensors"), f"file://{tmp_path}/w.safetensors", str(tmp_path / "w.pt"),
                 f"file://{tmp_path}/w.pt"):
        assert_same_weights(load_weights(tiny(0), path), source)
    with pytest.raises(FileNotFoundError):
        load_weights(tiny(0), str(tmp_path / "missing.pt"))


def test_save_strips_compile_and_ddp_prefixes(tmp_path):
    source = randomized(4)
    save_weights(prefixed(prefixed(source.state_dict(), "_orig_mod."), "module."), str(tmp_path / "w.safetensors"))
    assert set(load_state_dict(str(tmp_path / "w.safetensors"))) == set(source.state_dict())


def test_strict_errors_name_missing_unexpected_and_mismatched_keys(tmp_path):
    state = randomized(5).state_dict()
    broken = dict(state)
    del broken["blocks.1.attn.qkv.weight"]
    broken["blocks.9.extra"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.attn\.qkv\.weight.*"
                                              r"unexpected keys: blocks\.9\.extra"):
        load_weights(tiny(0), str(tmp_path / "broken.pt"))
    model = load_weights(tiny(0), str(tmp_path / "broken.pt"), strict=False)
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    wrong = dict(state, **{"x_embedder.proj.weight": torch.zeros(64, 40, 1, 1)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"x_embedder\.proj\.weight: file \(64, 40, 1, 1\)"):
        load_weights(tiny(0), str(tmp_path / "wrong.pt"), strict=False)
    torch.save({"optimizer": {}}, tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_weights(tiny(0), str(tmp_path / "nothing.pt"))


SEMVAE_YAML = """
variables:
  bottleneck_dim: 4
model:
  variational: true
  bottleneck_dim: ${variables.bottleneck_dim}
  arch: "transformer"
  params:
    hidden_dim: 24
    transformer_heads: 4
    transformer_blocks: 2
"""


def test_official_semvae_checkpoint_loads_with_heads_from_config(tmp_path):
    torch.manual_seed(0)
    source = SemVAE(input_dim=24, hidden_dim=24, depth=2, num_heads=4, latent_channels=4, grid=3).eval()
    opt = torch.optim.AdamW(source.parameters(), lr=5e-5)
    torch.save({"model_state_dict": prefixed(source.state_dict()), "optimizer_state_dict": opt.state_dict(),
                "scheduler_state_dict": {}, "iteration": 1000000, "loss": 0.1, "loss_averages": {},
                "config": SEMVAE_YAML, "input_dim": 24, "bottleneck_dim": 4}, tmp_path / "semantic_ae_final.pt")
    loaded = load_semvae(str(tmp_path / "semantic_ae_final.pt"), grid=3).eval()
    assert loaded.config == source.config
    assert_same_weights(loaded, source)
    features = torch.randn(2, 9, 24)
    # 4 heads (from the YAML) vs the fallback 6 (which also divides 24) give different attention.
    torch.testing.assert_close(loaded.encode(features, sample=False), source.encode(features, sample=False))
    # The generic loader reads the same layout.
    target = SemVAE(input_dim=24, hidden_dim=24, depth=2, num_heads=4, latent_channels=4, grid=3)
    assert_same_weights(load_weights(target, str(tmp_path / "semantic_ae_final.pt")), source)


def test_semvae_safetensors_round_trip_keeps_architecture(tmp_path):
    torch.manual_seed(1)
    source = SemVAE(input_dim=24, hidden_dim=16, depth=1, num_heads=2, mlp_ratio=2.0, latent_channels=4, grid=3)
    save_semvae(source, str(tmp_path / "weights.safetensors"), metadata={"standin": True})
    loaded = load_semvae(str(tmp_path / "weights.safetensors"))
    assert loaded.config == source.config and loaded.grid == 3
    assert_same_weights(loaded, source)
    assert read_weights_metadata(str(tmp_path / "weights.safetensors"))["standin"] == "true"
