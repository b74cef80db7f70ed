"""storage.fingerprint: stable across runs/processes/key order, sensitive to every input."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.fingerprint import canonical_json, fingerprint

CONFIG = {"lr": 1e-4, "dims": [16, 16], "name": "x", "nested": {"b": True, "a": None}}
UPSTREAM = {"dinov2_features": "0123456789abcdef"}
# Pinned: a change here moves every cached output to a new directory, so it must be deliberate.
GOLDEN = "bd577a38c25ecd97"


def test_golden_value_and_format():
    fp = fingerprint("semvae", "v1", CONFIG, UPSTREAM)
    assert fp == GOLDEN
    assert len(fp) == 16 and int(fp, 16) >= 0


def test_equals_sha256_of_canonical_json():
    payload = canonical_json({"stage": "semvae", "code_version": "v1", "config": CONFIG, "upstream": UPSTREAM})
    assert payload.startswith('{"code_version":"v1","config":{"dims":[16,16],"lr":0.0001,')
    assert fingerprint("semvae", "v1", CONFIG, UPSTREAM) == hashlib.sha256(payload.encode()).hexdigest()[:16]


def test_same_meaning_same_fingerprint():
    @dataclasses.dataclass
    class Nested:
        b: bool = True
        a: None = None

    reordered = {"nested": {"a": None, "b": True}, "name": "x", "dims": (16, 16), "lr": 0.0001}
    as_dataclass = {**CONFIG, "nested": Nested()}
    numpy_values = {**CONFIG, "lr": np.float64(1e-4), "dims": [np.int64(16), 16]}
    for config in (reordered, as_dataclass, numpy_values):
        assert fingerprint("semvae", "v1", config, UPSTREAM) == GOLDEN
    # 2 and 2.0 are the same config value; other floats keep their exact shortest repr
    assert canonical_json({"x": 2.0}) == canonical_json({"x": 2}) == '{"x":2}'
    assert canonical_json({"x": 0.1 + 0.2}) == '{"x":0.30000000000000004}'


def test_stable_in_a_fresh_process_with_another_hash_seed():
    code = ("from storage.fingerprint import fingerprint;"
            f"print(fingerprint('semvae', 'v1', {CONFIG!r}, {UPSTREAM!r}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == GOLDEN


@pytest.mark.parametrize("change", [
    lambda s, v, c, u: ("semantic_latents", v, c, u),
    lambda s, v, c, u: (s, "v2", c, u),
    lambda s, v, c, u: (s, v, {**c, "lr": 1.0001e-4}, u),
    lambda s, v, c, u: (s, v, {**c, "dims": [16, 8]}, u),
    lambda s, v, c, u: (s, v, {**c, "dims": [16, 16, 16]}, u),
    lambda s, v, c, u: (s, v, {**c, "nested": {"a": None, "b": False}}, u),
    lambda s, v, c, u: (s, v, {**c, "nested": {"a": None, "b": 1}}, u),  # True and 1 differ
    lambda s, v, c, u: (s, v, {**c, "extra": None}, u),
    lambda s, v, c, u: (s, v, {**c, "name": "X"}, u),
    lambda s, v, c, u: (s, v, c, {"dinov2_features": "0123456789abcdee"}),
    lambda s, v, c, u: (s, v, c, {**u, "texture_latents": "ffffffffffffffff"}),
    lambda s, v, c, u: (s, v, c, {}),
])
def test_every_input_change_changes_the_fingerprint(change):
    assert fingerprint(*change("semvae", "v1", CONFIG, UPSTREAM)) != GOLDEN


def test_rejects_values_without_a_canonical_form():
    with pytest.raises(TypeError, match="cannot fingerprint"):
        canonical_json({"f": object()})
    assert canonical_json({"x": float("nan")}) == '{"x":"nan"}'
