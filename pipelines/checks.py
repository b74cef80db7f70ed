"""Asset checks computed from a stage manifest (its stats and counts), never by re-reading the artifacts.

Every stage asset declares the same four checks; the FID assets add ``fid_finite``, the trained models
``weights_readable``. They are evaluated in the asset's own step (no extra process per check) right after the
manifest is known.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterator

import dagster as dg

from storage import fs

STATS_FINITE = "stats_finite"
EXPECTED_COUNTS = "expected_counts"
STATS_IN_RANGE = "stats_in_range"
ARTIFACTS_EXIST = "artifacts_exist"
FID_FINITE = "fid_finite"
WEIGHTS_READABLE = "weights_readable"
FID_METRIC = "fid"
FID_ASSETS = ("fid_report", "checkpoint_fid")
WEIGHTS_ASSETS = ("semvae", "sfd_model", "autoguidance_model")
# Loose sanity bounds: a latent/feature mean beyond this or a collapsed std means a broken encoder or scaling.
MAX_ABS_MEAN = 1e4
STD_RANGE = (1e-6, 1e4)
MAX_ARTIFACTS_CHECKED = 64


def check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    specs = [
        dg.AssetCheckSpec(STATS_FINITE, asset=asset, blocking=True,
                          description="no NaN/Inf anywhere in the manifest's stats and metrics"),
        dg.AssetCheckSpec(EXPECTED_COUNTS, asset=asset, blocking=True,
                          description="counts are non-negative, some positive, and equal the profile's 'expect' "
                                      "entries"),
        dg.AssetCheckSpec(STATS_IN_RANGE, asset=asset,
                          description=f"every *mean* stat within +-{MAX_ABS_MEAN:g}, every *std* stat in "
                                      f"{STD_RANGE}"),
        dg.AssetCheckSpec(ARTIFACTS_EXIST, asset=asset, blocking=True,
                          description="the artifacts the manifest names (shards, arrays, checkpoints) exist "
                                      f"(at most {MAX_ARTIFACTS_CHECKED}, spread over the list)"),
    ]
    if asset in FID_ASSETS:
        specs.append(dg.AssetCheckSpec(FID_FINITE, asset=asset, description="FID was computed and is finite"))
    if asset in WEIGHTS_ASSETS:
        specs.append(dg.AssetCheckSpec(WEIGHTS_READABLE, asset=asset, blocking=True,
                                       description="every .safetensors artifact has a valid header whose tensors "
                                                   "fill the file exactly (read: the header only)"))
    return specs


def _numbers(value: Any, prefix: str) -> Iterator[tuple[str, float]]:
    """(dotted key, number) for every number nested in dicts/lists."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield prefix, float(value)
    elif isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        yield prefix, float(value)  # JSON has no NaN: writers may spell it as a string
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{prefix}[{i}]")


def _finite(manifest: dict[str, Any]) -> tuple[bool, str]:
    bad = [key for key, x in _numbers({"stats": manifest.get("stats"), "metrics": manifest.get("metrics")}, "")
           if not math.isfinite(x)]
    return (not bad, f"non-finite: {bad[:10]}" if bad else "all stats and metrics are finite")


def _counts(manifest: dict[str, Any], expected: dict[str, Any]) -> tuple[bool, str]:
    counts = manifest.get("counts") or {}
    scalars = {k: v for k, v in counts.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    problems = [f"{k}={counts.get(k)!r}, expected {v!r}" for k, v in expected.items() if counts.get(k) != v]
    problems += [f"{k}={v!r} is negative" for k, v in scalars.items() if v < 0]
    if not any(v > 0 for v in scalars.values()):
        problems.append(f"no positive count in {scalars}")
    return (not problems, "; ".join(problems) if problems else f"counts {scalars} as expected")


def _in_range(manifest: dict[str, Any]) -> tuple[bool, str]:
    problems = []
    for key, x in _numbers(manifest.get("stats") or {}, ""):
        leaf = key.rsplit(".", 1)[-1].split("[")[0].lower()
        if "mean" in leaf and not abs(x) <= MAX_ABS_MEAN:
            problems.append(f"{key}={x:g}")
        if "std" in leaf and not STD_RANGE[0] <= x <= STD_RANGE[1]:
            problems.append(f"{key}={x:g}")
    return (not problems, f"out of range: {problems[:10]}" if problems else "stats within sanity bounds")


def artifact_urls(value: Any) -> list[str]:
    """Every URL in an artifacts entry (a URL, or lists/dicts of them, e.g. the shard list)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [url for item in value.values() for url in artifact_urls(item)]
    if isinstance(value, (list, tuple)):
        return [url for item in value for url in artifact_urls(item)]
    return []


def _spread(urls: list[str], limit: int) -> list[str]:
    """At most ``limit`` URLs spread over the list, first and last included (bounded object-store requests)."""
    if len(urls) <= limit:
        return urls
    return [urls[round(i * (len(urls) - 1) / (limit - 1))] for i in range(limit)]


def _artifacts(manifest: dict[str, Any]) -> tuple[bool, str]:
    urls = artifact_urls(manifest.get("artifacts") or {})
    checked = _spread(urls, MAX_ARTIFACTS_CHECKED)
    missing = [url for url in checked if not fs.exists(url)]
    if missing:
        return False, f"missing: {missing[:10]}"
    return bool(urls), f"{len(checked)} of {len(urls)} artifact(s) checked, all present" if urls else "no artifacts"


def _fid(manifest: dict[str, Any]) -> tuple[bool, str]:
    value = (manifest.get("metrics") or {}).get(FID_METRIC)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return ok, f"FID = {value!r}"


def safetensors_problem(url: str) -> str | None:
    """Why ``url`` is not a complete safetensors file (None when it is), from its header and size alone."""
    filesystem, path = fs.filesystem(url)
    size = filesystem.size(path)
    with filesystem.open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return "shorter than a safetensors header"
        header_len = int.from_bytes(prefix, "little")
        if header_len <= 0 or 8 + header_len > size:
            return f"header length {header_len} does not fit in {size} bytes"
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            return f"header is not JSON ({e})"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        return "no tensors"
    data_bytes = max(int(v["data_offsets"][1]) for v in tensors.values())
    if 8 + header_len + data_bytes != size:
        return f"tensors end at byte {8 + header_len + data_bytes}, the file has {size} (truncated or padded)"
    return None


def _weights(manifest: dict[str, Any]) -> tuple[bool, str]:
    urls = [url for url in artifact_urls(manifest.get("artifacts") or {}) if url.endswith(".safetensors")]
    problems = {url: problem for url in urls if (problem := safetensors_problem(url))}
    if problems:
        return False, f"unreadable: {problems}"
    return bool(urls), f"{len(urls)} weight file(s) readable" if urls else "no .safetensors artifact"


def evaluate(asset: str, manifest: dict[str, Any], expected_counts: dict[str, Any]) -> list[dg.AssetCheckResult]:
    """The results of ``check_specs(asset)`` for one manifest."""
    outcomes = {
        STATS_FINITE: _finite(manifest),
        EXPECTED_COUNTS: _counts(manifest, expected_counts),
        STATS_IN_RANGE: _in_range(manifest),
        ARTIFACTS_EXIST: _artifacts(manifest),
    }
    if asset in FID_ASSETS:
        outcomes[FID_FINITE] = _fid(manifest)
    if asset in WEIGHTS_ASSETS:
        outcomes[WEIGHTS_READABLE] = _weights(manifest)
    return [dg.AssetCheckResult(asset_key=asset, check_name=name, passed=passed,
                                metadata={"detail": dg.MetadataValue.text(detail)})
            for name, (passed, detail) in outcomes.items()]
