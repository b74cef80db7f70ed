"""Semantic latent cache: stored latents = the encoder called directly, stats, resume by chunk, rank split."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from train_helpers import make_dino_stage, make_texture_stage, run_ranks
from sfd_core.latent_data import FEATURES_STORE, LATENTS_STORE, array_url, tokens_from_grid
from sfd_core.semantic_latents import Config, chunk_seed, main, rank_chunks, run
from sfd_core.semvae import SemVAE, save_semvae
from sfd_core.train_semvae import WEIGHTS_FILE
from storage import fs
from storage.arrays import open_array
from storage.manifest import write_success
from storage.parts import PartMarkers

N, CHUNK, DIM, GRID, LATENT = 40, 8, 16, 4, 4


@pytest.fixture
def inputs(tmp_path):
    torch.manual_seed(0)
    semvae_dir = str(tmp_path / "semvae")
    model = SemVAE(input_dim=DIM, hidden_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, latent_channels=LATENT,
                   grid=GRID)
    save_semvae(model, fs.join(semvae_dir, WEIGHTS_FILE))
    write_success(semvae_dir, {"stage": "semvae", "fingerprint": "semvae-fp", "uri": semvae_dir})
    return dict(features_url=make_dino_stage(str(tmp_path / "dino"), n=N, dim=DIM, grid=GRID, chunk=CHUNK),
                texture_url=make_texture_stage(str(tmp_path / "tex"), n=N, chunk=CHUNK), semvae_url=semvae_dir,
                model=model.eval())


def config(out_url: str, inputs: dict, **changes) -> Config:
    base = Config(out_url=out_url, features_url=inputs["features_url"], semvae_url=inputs["semvae_url"],
                  texture_url=inputs["texture_url"], batch_size=3, device="cpu")
    return dataclasses.replace(base, **changes)


def stored(out_url: str, name: str) -> np.ndarray:
    return open_array(array_url(out_url, LATENTS_STORE, name))[:]


def test_latents_equal_the_encoder_called_directly(tmp_path, inputs, single_thread):
    out = str(tmp_path / "out")
    manifest = run(config(out, inputs))
    dino = open_array(array_url(inputs["features_url"], FEATURES_STORE, "dino"))[:]
    dino_flip = open_array(array_url(inputs["features_url"], FEATURES_STORE, "dino_flip"))[:]
    for name, source, flipped in (("semantic", dino, False), ("semantic_flip", dino_flip, True)):
        latents = stored(out, name)
        assert latents.shape == (N, LATENT, GRID, GRID) and latents.dtype == np.float32
        for chunk in range(N // CHUNK):
            rows = slice(chunk * CHUNK, (chunk + 1) * CHUNK)
            generator = torch.Generator().manual_seed(chunk_seed(0, chunk, flipped))
            with torch.no_grad():
                direct = inputs["model"].encode(tokens_from_grid(source[rows]), sample=True, generator=generator)
            np.testing.assert_allclose(latents[rows], direct.numpy(), rtol=0, atol=1e-5)
    assert not np.allclose(stored(out, "semantic"), stored(out, "semantic_flip"))  # independent draws
    np.testing.assert_array_equal(stored(out, "labels"),
                                  open_array(array_url(inputs["features_url"], FEATURES_STORE, "labels"))[:])

    # Stats: every sample is used here (N < stats_samples); float64 reference over [N, h, w] per channel.
    reference = stored(out, "semantic").astype(np.float64)
    np.testing.assert_allclose(manifest["stats"]["semantic"]["mean"], reference.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(manifest["stats"]["semantic"]["std"], reference.std(axis=(0, 2, 3), ddof=1),
                               rtol=1e-12)
    texture_manifest = json.loads((tmp_path / "tex" / "_SUCCESS.json").read_text())
    assert manifest["stats"]["texture"] == texture_manifest["stats"]["texture"]
    assert manifest["upstream"] == {"dinov2_features": "dino", "semvae": "semvae-fp", "texture_latents": "tex"}
    assert manifest["counts"] == {"samples": N, "chunks": N // CHUNK}


def test_resume_redoes_only_unfinished_chunks(tmp_path, inputs, single_thread):
    first = str(tmp_path / "first")
    run(config(first, inputs))
    original = {name: stored(first, name) for name in ("semantic", "semantic_flip")}
    # An interrupted run: chunk 1 was never marked (its rows hold junk); chunk 0 is marked done.
    os.remove(tmp_path / "first" / "_SUCCESS.json")
    os.remove(tmp_path / "first" / "_parts" / "chunk-000001.json")
    for name in original:
        array = open_array(array_url(first, LATENTS_STORE, name), mode="r+")
        array[0:2 * CHUNK] = np.full((2 * CHUNK, LATENT, GRID, GRID), 7.0, dtype=np.float32)
    assert PartMarkers(first).done("chunk-000000")

    run(config(first, inputs))
    for name, values in original.items():
        resumed = stored(first, name)
        assert (resumed[:CHUNK] == 7.0).all()  # done chunk skipped, not recomputed
        np.testing.assert_array_equal(resumed[CHUNK:], values[CHUNK:])  # chunk 1 recomputed identically


def test_ranks_split_chunks_and_match_one_process(tmp_path, inputs, single_thread):
    assert [list(rank_chunks(5, r, 2)) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert sorted(c for r in range(3) for c in rank_chunks(7, r, 3)) == list(range(7))
    one = str(tmp_path / "one")
    run(config(one, inputs))
    two = str(tmp_path / "two")
    cfg = config(two, inputs, batch_size=5)  # another batch size too: results must not depend on it
    assert run_ranks(main, cfg) == [0, 0]
    for name in ("semantic", "semantic_flip", "labels"):
        np.testing.assert_allclose(stored(two, name), stored(one, name), rtol=0, atol=1e-6)
    assert sorted(PartMarkers(two).all()) == [f"chunk-{c:06d}" for c in range(N // CHUNK)] + ["labels"]
