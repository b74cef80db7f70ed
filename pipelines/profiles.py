"""Profiles: a named, complete set of stage configs (``pipelines/profiles/<name>.yaml`` or a user YAML file).

A profile file has ``description``, optional ``extends`` (a built-in name or a path, deep-merged under this file),
``vars`` (shared values, used as ``${vars.x}`` anywhere below), ``compute`` and ``pretrained`` (defaults for those
resources), ``stages`` (asset -> stage config values, without ``out_url`` and upstream URIs, which the pipeline
fills in) and ``expect`` (asset -> expected manifest counts, used by the asset checks).

``validate_profile`` runs before any work and raises ``ConfigError`` naming the field and the fix.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import yaml

from pipelines.stages import STAGES
from sfd_core.config import ConfigError
from storage import fs

PROFILE_ENV = "SFD_PROFILE"
DEFAULT_PROFILE = "tiny"
BUILTIN_PROFILES = ("tiny", "imagenet256")

# Names of sfd_core.models.MODEL_CONFIGS, repeated here because reading them would import torch when
# definitions load; tests/pipelines checks the two lists agree.
KNOWN_MODELS = ("LightningDiT-B/1", "LightningDiT-L/1", "LightningDiT-XL/1", "LightningDiT-1p0B/1",
                "LightningDiT-tiny/1")
MODEL_FIELD = "model"          # stage config field naming a LightningDiT config
DELTA_T_FIELD = "delta_t"      # semantic-first offset; the method needs 0 <= delta_t < 1
SOURCE_ASSET, SOURCE_FIELD = "imagenet_shards", "source"
BUILTIN_SOURCE_PREFIX = "builtin:"

_TOP_LEVEL_KEYS = {"description", "extends", "vars", "compute", "pretrained", "stages", "expect"}
_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\.([A-Za-z0-9_]+)\}")


@dataclass(frozen=True)
class Profile:
    name: str
    origin: str                                   # the file it came from
    description: str = ""
    vars: dict[str, Any] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)
    pretrained: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    expect: dict[str, dict[str, Any]] = field(default_factory=dict)

    def stage_values(self, asset: str) -> dict[str, Any]:
        """The stage's config values with ``${vars.*}`` filled in (``${compute.*}``/``${pretrained.*}`` kept)."""
        if asset not in self.stages:
            raise ConfigError(f"profile {self.name!r} ({self.origin}): no config for stage {asset!r}; "
                              f"add a 'stages.{asset}' section")
        return substitute(copy.deepcopy(self.stages[asset]), {"vars": self.vars}, keep_unknown=True)


def _builtin_path(name: str) -> Path:
    return Path(str(importlib_resources.files("pipelines") / "profiles" / f"{name}.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"profile file {path}: cannot read it ({e}); pass a built-in name "
                          f"{list(BUILTIN_PROFILES)} or an existing YAML path") from e
    if not isinstance(data, dict):
        raise ConfigError(f"profile file {path}: expected a mapping at the top level")
    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"profile file {path}: unknown top-level key(s) {unknown}; "
                          f"valid keys: {sorted(_TOP_LEVEL_KEYS)}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_ref(ref: str, relative_to: Path | None) -> tuple[str, Path]:
    if ref in BUILTIN_PROFILES:
        return ref, _builtin_path(ref)
    path = Path(ref).expanduser()
    if not path.is_absolute() and relative_to is not None and not path.exists():
        path = relative_to / path
    if not path.exists():
        raise ConfigError(f"profile {ref!r}: not a built-in profile {list(BUILTIN_PROFILES)} and no such file; "
                          f"set {PROFILE_ENV} (or the profile resource's 'name') to one of those or a YAML path")
    return path.stem, path


def _load_raw(ref: str, relative_to: Path | None, seen: tuple[str, ...]) -> tuple[str, Path, dict[str, Any]]:
    name, path = _resolve_ref(ref, relative_to)
    key = str(path.resolve())
    if key in seen:
        raise ConfigError(f"profile {path}: 'extends' forms a cycle through {list(seen)}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent:
        _, _, base = _load_raw(str(parent), path.parent, seen + (key,))
        data = deep_merge(base, data)
    return name, path, data


def load_profile(ref: str | None = None, overrides: dict[str, Any] | None = None) -> Profile:
    """A built-in profile name or a YAML path (``SFD_PROFILE`` or ``tiny`` when None), plus dict overrides."""
    ref = ref or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    name, path, data = _load_raw(ref, None, ())
    if overrides:
        data = deep_merge(data, overrides)
    stages = data.get("stages") or {}
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"profile {name!r} ({path}): unknown stage(s) {unknown} under 'stages'; "
                          f"valid: {sorted(STAGES)}")
    variables = {"vars": dict(data.get("vars") or {})}
    return Profile(name=name, origin=str(path), description=str(data.get("description", "")),
                   vars=variables["vars"], compute=substitute(dict(data.get("compute") or {}), variables),
                   pretrained=substitute(dict(data.get("pretrained") or {}), variables),
                   stages={k: dict(v or {}) for k, v in stages.items()},
                   expect={k: dict(v or {}) for k, v in (data.get("expect") or {}).items()})


def substitute(value: Any, namespaces: dict[str, dict[str, Any]], keep_unknown: bool = False) -> Any:
    """Fill ``${ns.key}`` placeholders from ``namespaces``; a whole-string placeholder keeps the value's type."""
    if isinstance(value, dict):
        return {k: substitute(v, namespaces, keep_unknown) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, namespaces, keep_unknown) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match[str]) -> Any:
        ns, key = match.group(1), match.group(2)
        if ns not in namespaces:
            if keep_unknown:
                return match.group(0)
            raise ConfigError(f"placeholder {match.group(0)}: unknown namespace {ns!r}; "
                              f"valid: {sorted(namespaces)}")
        if key not in namespaces[ns]:
            raise ConfigError(f"placeholder {match.group(0)}: no {ns} entry named {key!r}; "
                              f"define it under '{ns}:' (known: {sorted(namespaces[ns])})")
        return namespaces[ns][key]

    whole = _PLACEHOLDER.fullmatch(value)
    if whole:
        return lookup(whole)
    return _PLACEHOLDER.sub(lambda m: str(lookup(m)), value)


def _field(profile: Profile, asset: str, key: str) -> str:
    return f"profile {profile.name!r} ({profile.origin}) stages.{asset}.{key}"


def _check_stage_values(profile: Profile) -> None:
    for asset in profile.stages:
        values = profile.stage_values(asset)
        model = values.get(MODEL_FIELD)
        if model is not None and model not in KNOWN_MODELS:
            raise ConfigError(f"{_field(profile, asset, MODEL_FIELD)}: unknown model size {model!r}; "
                              f"set it to one of {list(KNOWN_MODELS)}")
        if DELTA_T_FIELD in values:
            try:
                delta_t = float(values[DELTA_T_FIELD])
            except (TypeError, ValueError):
                delta_t = float("nan")
            if not 0.0 <= delta_t < 1.0:
                raise ConfigError(f"{_field(profile, asset, DELTA_T_FIELD)}: {values[DELTA_T_FIELD]!r} is outside "
                                  f"[0, 1); the paper's value is 0.3")


def _check_image_source(profile: Profile) -> None:
    if SOURCE_ASSET not in profile.stages:
        return
    source = profile.stage_values(SOURCE_ASSET).get(SOURCE_FIELD)
    where = _field(profile, SOURCE_ASSET, SOURCE_FIELD)
    if not source:
        raise ConfigError(f"{where}: missing; set it to an ImageNet folder (train/<wnid>/*.JPEG), a tar, "
                          f"or {BUILTIN_SOURCE_PREFIX}tiny")
    source = str(source)
    if source.startswith(BUILTIN_SOURCE_PREFIX):
        return
    try:
        found = fs.exists(source)
    except Exception as e:  # noqa: BLE001 - any storage error means the same fix
        raise ConfigError(f"{where}: cannot read {source!r} ({type(e).__name__}: {e}); check the path and "
                          f"its credentials") from e
    if not found:
        raise ConfigError(f"{where}: {source!r} does not exist; point it at your ImageNet folder "
                          f"(train/<wnid>/*.JPEG) or a tar in your profile YAML, or use {BUILTIN_SOURCE_PREFIX}tiny")


def check_storage_root(root: str) -> None:
    """A remote root's bucket must be listable; a local root must be creatable."""
    if "://" not in root or root.startswith("file://"):
        local = Path(root.removeprefix("file://"))
        try:
            local.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"storage.root: cannot create {root!r} ({e}); set SFD_STORAGE_ROOT or the storage "
                              f"resource's 'root' to a writable directory") from e
        return
    try:
        filesystem, path = fs.filesystem(root)
        bucket = path.strip("/").split("/")[0]
        filesystem.ls(bucket)
    except Exception as e:  # noqa: BLE001 - missing bucket, denied, unreachable endpoint: same fix
        raise ConfigError(f"storage.root: cannot read bucket of {root!r} ({type(e).__name__}: {e}); check the "
                          f"bucket name, SFD_S3_ENDPOINT_URL/AWS_ENDPOINT_URL and AWS_ACCESS_KEY_ID/"
                          f"AWS_SECRET_ACCESS_KEY") from e


def validate_profile(profile: Profile, storage_root: str | None = None) -> None:
    """Everything that can be known wrong before any work starts."""
    missing = sorted(set(STAGES) - set(profile.stages))
    if missing:
        raise ConfigError(f"profile {profile.name!r} ({profile.origin}): no config for stage(s) {missing}; "
                          f"add them under 'stages' or 'extends' a complete profile")
    _check_stage_values(profile)
    _check_image_source(profile)
    if storage_root is not None:
        check_storage_root(storage_root)
