"""Chunk-then-buffer shuffled streams over Zarr: order, sharding, resume, workers, SFD normalisation."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from train_helpers import make_dino_stage, make_semantic_stage, make_texture_stage, write_arrays
from sfd_core.latent_data import (FEATURES_STORE, LATENTS_STORE, LatentSources, SFDLatentDataset, ShufflePlan,
                                  StreamBatches, WindowedArrays, array_url, common_block_size, sfd_plan,
                                  streams_of_rank)
from storage.arrays import open_array
from storage.manifest import read_success


class RowIds(WindowedArrays):
    """Batches of (row ids, flip choices, values) to observe the order."""

    def __init__(self, urls, plan, stream):
        super().__init__({"values": urls}, plan, stream)

    def prepare_window(self, picked, rows, flips):
        return {"rows": torch.from_numpy(rows), "flips": torch.from_numpy(flips),
                "values": torch.from_numpy(picked["values"])}

    def finalize_batch(self, fields):
        return fields["rows"], fields["flips"], fields["values"]


@pytest.fixture
def values_url(tmp_path):
    n = 100
    values = np.arange(n, dtype=np.float32).reshape(n, 1)  # row r holds r, its flip -r - 1000
    write_arrays(str(tmp_path), FEATURES_STORE, {"values": values, "values_flip": -values - 1000}, chunk=8)
    return tuple(array_url(str(tmp_path), FEATURES_STORE, name) for name in ("values", "values_flip"))


def plan(**changes) -> ShufflePlan:
    return ShufflePlan(**{**dict(num_samples=100, block_size=8, window_blocks=2, num_streams=2, batch_size=4,
                                 seed=3), **changes})


def epoch_rows(url: tuple[str, str], p: ShufflePlan, epoch: int) -> list[np.ndarray]:
    """Row ids of each stream's batches in ``epoch``."""
    out = []
    for stream in range(p.num_streams):
        batches = StreamBatches([RowIds(url, p, stream)], epoch=epoch)
        out.append(np.stack([next(batches)[0][0].numpy() for _ in range(p.steps_per_epoch(epoch))]))
    return out


def test_epoch_order_is_deterministic_disjoint_and_reshuffled(values_url):
    p = plan()
    rows = epoch_rows(values_url, p, 0)
    assert [len(r) for r in rows] == [p.steps_per_epoch(0)] * 2
    seen = np.concatenate([r.ravel() for r in rows])
    assert len(np.unique(seen)) == len(seen) and seen.max() < 100          # no sample twice in an epoch
    assert len(seen) >= 100 - 2 * 2 * (2 * 8 - 4)                           # only window leftovers are dropped
    for stream in rows:  # each window draws from whole blocks, never from outside its blocks
        assert all(len(np.unique(batch // 8)) <= 2 for batch in stream)
    assert all(np.array_equal(a, b) for a, b in zip(rows, epoch_rows(values_url, p, 0)))
    assert not np.array_equal(np.concatenate(rows), np.concatenate(epoch_rows(values_url, p, 1)))
    assert not np.array_equal(np.concatenate(rows), np.concatenate(epoch_rows(values_url, plan(seed=4), 0)))


def test_windows_without_a_full_batch_are_skipped(values_url):
    # Blocks of 8, 8, ..., 4 rows (100 = 12 x 8 + 4), one block per window, batches of 8: the window holding
    # only the short last block yields nothing, wherever the shuffle puts it.
    p = plan(window_blocks=1, batch_size=8, num_streams=1)
    for epoch in range(4):
        assert p.steps_per_epoch(epoch) == 12
        assert len(epoch_rows(values_url, p, epoch)[0]) == 12
    resumed = StreamBatches([RowIds(values_url, p, 0)], epoch=0, position=11)
    assert len(next(resumed)[0][0]) == 8 and resumed.state_dict() == {"epoch": 1, "position": 0}


def test_plan_helpers():
    assert common_block_size([8, 12, 4]) == 24
    assert list(streams_of_rank(4, 1, 2)) == [2, 3]
    with pytest.raises(ValueError, match="multiple of the world size"):
        streams_of_rank(3, 0, 2)
    with pytest.raises(ValueError, match="micro-batch"):
        plan(window_blocks=1, batch_size=9)


def _take(batches: StreamBatches, steps: int) -> list:
    return [next(batches) for _ in range(steps)]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(itertools.chain.from_iterable(itertools.chain.from_iterable(a)),
                                                 itertools.chain.from_iterable(itertools.chain.from_iterable(b))))


def test_resume_workers_and_rank_split_give_the_same_batches(values_url):
    p = plan()
    steps = p.steps_per_epoch(0) + 5  # across an epoch boundary
    both = StreamBatches([RowIds(values_url, p, s) for s in range(2)])
    reference = _take(both, steps)
    assert both.state_dict()["epoch"] == 1

    # Resume from a saved position (mid-epoch) and continue.
    head = StreamBatches([RowIds(values_url, p, s) for s in range(2)])
    first = _take(head, 7)
    resumed = StreamBatches([RowIds(values_url, p, s) for s in range(2)], **head.state_dict())
    assert _same(first + _take(resumed, steps - 7), reference)

    # Two ranks (one stream each) see exactly the micro-batches one process sees.
    for rank in range(2):
        alone = StreamBatches([RowIds(values_url, p, rank)])
        assert _same([[b[0]] for b in _take(alone, steps)], [[b[rank]] for b in reference])

    # DataLoader workers (windows round-robin) do not change the order.
    workers = StreamBatches([RowIds(values_url, p, s) for s in range(2)], num_workers=4)
    assert _same(_take(workers, steps), reference)
    workers.close()
    # The values read are those of the rows named, from the flip array exactly where the flip was drawn.
    for step in reference:
        for rows, flips, values in step:
            assert torch.equal(torch.where(flips, -rows.float() - 1000, rows.float()), values[:, 0])
    flips = torch.cat([b[1] for step in reference for b in step]).float()
    assert 0.3 < flips.mean() < 0.7


class SFDWithRows(SFDLatentDataset):
    def prepare_window(self, picked, rows, flips):
        return {**super().prepare_window(picked, rows, flips), "rows": torch.from_numpy(rows),
                "flips": torch.from_numpy(flips)}

    def finalize_batch(self, fields):
        return (*super().finalize_batch(fields), fields["rows"].numpy(), fields["flips"].numpy())


def test_sfd_batches_match_float64_reference(tmp_path):
    sources = LatentSources(
        texture_url=make_texture_stage(str(tmp_path / "tex")), semantic_url=make_semantic_stage(str(tmp_path / "sem")),
        dino_url=make_dino_stage(str(tmp_path / "dino")), texture_stats={}, semantic_stats={}, latent_multiplier=0.5)
    sources = dataclasses.replace(sources, texture_stats=read_success(sources.texture_url)["stats"]["texture"],
                                  semantic_stats=read_success(sources.semantic_url)["stats"]["semantic"])
    p = sfd_plan(sources, batch_size=4, num_streams=1, seed=0, shuffle_window=16)
    raw = {name + suffix: open_array(url)[:].astype(np.float64)
           for name, urls in sources.pairs().items() for suffix, url in zip(("", "_flip"), urls)}
    labels = open_array(sources.labels_url())[:]
    stats = {k: (np.asarray(s["mean"], np.float64).reshape(1, -1, 1, 1), np.asarray(s["std"], np.float64)
                 .reshape(1, -1, 1, 1)) for k, s in (("texture", sources.texture_stats),
                                                      ("semantic", sources.semantic_stats))}
    flips = []
    batches = StreamBatches([SFDWithRows(sources, p, 0)])
    for _ in range(p.steps_per_epoch(0)):
        [(x, y, dino, rows, flip)] = next(batches)
        suffix = np.where(flip, "_flip", "")
        pick = lambda name: np.stack([raw[name + s][r] for r, s in zip(rows, suffix)])  # noqa: E731
        expected = 0.5 * np.concatenate([(pick("texture") - stats["texture"][0]) / stats["texture"][1],
                                         (pick("semantic") - stats["semantic"][0]) / stats["semantic"][1]], axis=1)
        assert x.dtype == torch.float32 and dino.dtype == torch.float32
        np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(dino.numpy(), pick("dino"))
        np.testing.assert_array_equal(y.numpy(), labels[rows])
        flips.extend(flip)
    assert 0 < np.mean(flips) < 1  # both the image and its flip are used
    assert p.block_size == 8 and raw["texture"].shape[1] + raw["semantic"].shape[1] == x.shape[1]
    assert FEATURES_STORE in sources.labels_url() and LATENTS_STORE in sources.pairs()["semantic"][1]
