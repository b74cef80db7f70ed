"""Content fingerprints of stage outputs: hash(stage, code version, resolved config, upstream fingerprints).

The fingerprint names the output directory ``<root>/<stage>/<fingerprint>/``, so it must not change between
runs, processes or Python versions for the same inputs, and must change when any input does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Mapping

FINGERPRINT_HEX_CHARS = 16


def _canonical(obj: Any) -> Any:
    """Plain JSON values with one spelling per meaning (tuples are lists, 2.0 is 2, keys are strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canonical(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():  # numpy scalar
        return _canonical(obj.item())
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return repr(obj)  # "nan"/"inf"/"-inf": JSON has no spelling for them
        # A config may say 1 or 1.0 for the same value; repr() of other floats is shortest-roundtrip, stable.
        return int(obj) if obj.is_integer() and abs(obj) < 2**53 else obj
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}: {obj!r}")


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys and normalised values (see ``_canonical``)."""
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def fingerprint(stage: str, code_version: str, config: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """16 hex chars of SHA-256 over the canonical JSON of all four inputs."""
    payload = canonical_json({"stage": stage, "code_version": code_version, "config": config,
                              "upstream": upstream})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:FINGERPRINT_HEX_CHARS]
