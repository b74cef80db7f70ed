"""Where the pretrained networks come from, as the ``${pretrained.NAME}`` values of stage configs.

Two sources:
- ``standins``: small random-init networks in the real formats (``sfd_core.standins``), created on first use in a
  local cache directory; the tiny profile and the tests use them.
- ``files``: one entry per network in the profile's ``pretrained`` section (a path, or a loader spec dict with a
  ``path``), overridable per network by the pretrained resource. A missing file is a ``ConfigError`` naming the
  network and where to put the file.

Fingerprints hash ``identity`` (stand-in seed/resolution, or file name and size), never local paths, so the same
work keeps its fingerprint across machines and checkouts.
"""
from __future__ import annotations

import copy
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfd_core.config import ConfigError

STANDINS, FILES = "standins", "files"
SOURCES = (STANDINS, FILES)
STANDINS_FLAG = "standins"      # ${pretrained.standins}: true when stand-ins are used (reports say so)
STANDINS_DIR_ENV = "SFD_STANDINS_DIR"
DEFAULT_STANDINS_DIR = Path.home() / ".cache" / "sfd-pipeline" / "standins"
_SECTION_KEYS = {"source", "seed", "resolution"}
# The networks sfd_core.standins.make_standins writes (named here so fingerprints need no torch import; a test
# checks the two agree).
STANDIN_NETWORKS = ("texture_vae", "texture_vae_f8", "dinov2", "inception", "semvae_official")


@dataclass(frozen=True)
class Weights:
    source: str
    section: dict[str, Any]          # the profile's pretrained section with resource overrides applied
    standins_dir: Path

    @property
    def identity(self) -> dict[str, Any]:
        """``${pretrained.*}`` values for fingerprints: stable across machines."""
        if self.source == STANDINS:
            tag = f"standins:seed={self.section.get('seed', 0)}:res={self._resolution()}"
            return {STANDINS_FLAG: True, **{name: f"{tag}:{name}" for name in STANDIN_NETWORKS}}
        return {STANDINS_FLAG: False, **{name: _file_identity(name, spec) for name, spec in self._files().items()}}

    def paths(self) -> dict[str, Any]:
        """``${pretrained.*}`` values for the stage programs (creates the stand-ins when needed)."""
        if self.source == STANDINS:
            return {STANDINS_FLAG: True, **self._make_standins()}
        return {STANDINS_FLAG: False, **self._files()}

    # -- stand-ins
    def _resolution(self) -> int:
        if "resolution" not in self.section:
            raise ConfigError("pretrained.resolution: the stand-in networks need the image resolution; set it in "
                              "the profile's 'pretrained' section (a multiple of 16)")
        return int(self.section["resolution"])

    def _directory(self) -> Path:
        return self.standins_dir / f"seed{int(self.section.get('seed', 0))}-res{self._resolution()}"

    def _make_standins(self) -> dict[str, Any]:
        directory = self._directory()
        directory.mkdir(parents=True, exist_ok=True)
        from sfd_core.standins import make_standins  # imports torch: only when a stage is about to run

        # Parallel steps may all need them the first time: one writes, the others wait and reuse.
        with open(directory.parent / f".{directory.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return make_standins(directory, seed=int(self.section.get("seed", 0)), resolution=self._resolution())

    # -- files
    def _files(self) -> dict[str, Any]:
        return {k: v for k, v in self.section.items() if k not in _SECTION_KEYS}


def _spec_path(spec: Any) -> str:
    return str(spec.get("path", "")) if isinstance(spec, dict) else str(spec)


def _file_identity(name: str, spec: Any) -> Any:
    path = _spec_path(spec)
    if not path:  # e.g. inception_weights "" = torch-fidelity's own cache copy
        return spec
    if not os.path.exists(path):
        raise ConfigError(f"pretrained.{name}: weights not found at {path!r}; download them there or point the "
                          f"profile's 'pretrained.{name}' (or the pretrained resource's weights.{name}) at them")
    p = Path(path)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    marker = f"{p.name}:{size}"
    if isinstance(spec, dict):
        return {**copy.deepcopy(spec), "path": marker}
    return marker


def resolve_pretrained(section: dict[str, Any], source: str | None = None, standins_dir: str | None = None,
                       weights: dict[str, str] | None = None) -> Weights:
    """The profile's ``pretrained`` section with the resource's overrides applied."""
    merged = copy.deepcopy(section)
    chosen = source or merged.get("source") or FILES
    if chosen not in SOURCES:
        raise ConfigError(f"pretrained.source: {chosen!r} is not one of {list(SOURCES)}")
    for name, path in (weights or {}).items():
        existing = merged.get(name)
        merged[name] = {**existing, "path": path} if isinstance(existing, dict) else path
    merged["source"] = chosen
    directory = standins_dir or os.environ.get(STANDINS_DIR_ENV) or DEFAULT_STANDINS_DIR
    return Weights(source=chosen, section=merged, standins_dir=Path(directory).expanduser().resolve())
