"""Dagster resources: where artifacts go, how stage programs are launched, which weights and profile to use.

Every field left at ``None`` falls back to the profile (``compute:``/``pretrained:`` sections) or the environment,
so the same definitions serve the tiny CPU demo and an 8-GPU ImageNet run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from pipelines import profiles
from pipelines.pretrained import Weights, resolve_pretrained
from pipelines.profiles import Profile

STORAGE_ROOT_ENV = "SFD_STORAGE_ROOT"
DEFAULT_STORAGE_ROOT = "artifacts"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_root(root: str | None) -> str:
    """Explicit root, else ``$SFD_STORAGE_ROOT``, else ``artifacts/``; local roots become absolute so manifests
    written from one working directory are readable from another."""
    url = root or os.environ.get(STORAGE_ROOT_ENV) or DEFAULT_STORAGE_ROOT
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    return os.path.abspath(url.removeprefix("file://"))


class StorageResource(dg.ConfigurableResource):
    """The artifact root: a local directory or ``s3://bucket/prefix`` (S3 options come from the environment,
    see ``storage.fs.storage_options``)."""

    root: Optional[str] = Field(default=None, description=f"artifact root URL; default ${STORAGE_ROOT_ENV} "
                                                         f"or '{DEFAULT_STORAGE_ROOT}'")

    @property
    def url(self) -> str:
        return resolve_root(self.root)


class ProfileResource(dg.ConfigurableResource):
    """Which profile (stage configs) a run uses."""

    name: Optional[str] = Field(default=None, description=f"built-in profile {list(profiles.BUILTIN_PROFILES)} "
                                                         f"or a YAML path; default ${profiles.PROFILE_ENV} or "
                                                         f"'{profiles.DEFAULT_PROFILE}'")

    def load(self) -> Profile:
        return profiles.load_profile(self.name)


class ComputeResource(dg.ConfigurableResource):
    """How stage programs run: device, GPUs per node (torchrun), precision, and cancellation grace time."""

    device: Optional[str] = Field(default=None, description="'cpu' or 'cuda'; default from the profile")
    nproc_per_node: Optional[int] = Field(default=None, description="processes per node for GPU stages "
                                                                    "(0 = every visible GPU); default from profile")
    precision: Optional[str] = Field(default=None, description="'fp32', 'bf16' or 'fp16'; default from profile")
    cuda_visible_devices: Optional[str] = Field(default=None, description="CUDA_VISIBLE_DEVICES for the stages")
    torchrun: list[str] = Field(default_factory=lambda: [sys.executable, "-m", "torch.distributed.run"],
                                description="the torchrun command")
    torchrun_args: list[str] = Field(default_factory=lambda: ["--standalone"],
                                     description="extra torchrun arguments (rendezvous, nnodes, ...)")
    python: str = Field(default_factory=lambda: sys.executable, description="interpreter for single-process runs")
    termination_timeout_s: float = Field(default=600.0, description="seconds a cancelled stage gets to save a "
                                                                    "checkpoint after SIGINT")

    def settings(self, profile: Profile) -> dict[str, Any]:
        """The effective ``compute`` namespace of a profile (``${compute.device}`` etc.)."""
        merged = {"device": "cpu", "nproc_per_node": 1, "precision": "fp32", **profile.compute}
        for key in ("device", "nproc_per_node", "precision"):
            value = getattr(self, key)
            if value is not None:
                merged[key] = value
        return merged

    def command(self, module: str, config_json: str, distributed: bool, settings: dict[str, Any]) -> list[str]:
        """``torchrun -m pipelines.pipes_entry`` on GPUs, plain ``python -m pipelines.pipes_entry`` otherwise."""
        entry = ["-m", "pipelines.pipes_entry", module, "--config", config_json]
        if distributed and str(settings["device"]).startswith("cuda"):
            nproc = int(settings["nproc_per_node"])
            return [*self.torchrun, *self.torchrun_args, f"--nproc-per-node={nproc if nproc > 0 else 'gpu'}",
                    *entry]
        return [self.python, *entry]

    def environment(self) -> dict[str, str]:
        env = {"PYTHONUNBUFFERED": "1",
               # the stage programs import sfd_core/storage/pipelines from this checkout, installed or not
               "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
        if self.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        return env

    def client(self) -> dg.PipesSubprocessClient:
        # no cwd change: relative paths in a profile mean the same to the stage as to the Dagster process
        return dg.PipesSubprocessClient(env=self.environment(), forward_termination=True,
                                        termination_timeout_seconds=self.termination_timeout_s)


class PretrainedResource(dg.ConfigurableResource):
    """Where each pretrained network's weights come from: ``standins`` (small random-init networks in the real
    formats, for tests and the tiny profile) or ``files`` (a path per network)."""

    source: Optional[str] = Field(default=None, description="'standins' or 'files'; default from the profile")
    standins_dir: Optional[str] = Field(default=None, description="local cache of the stand-in networks; "
                                                                  "default $SFD_STANDINS_DIR or "
                                                                  "~/.cache/sfd-pipeline/standins")
    weights: dict[str, str] = Field(default_factory=dict, description="network name -> weights path; "
                                                                      "overrides the profile's 'pretrained'")

    def resolve(self, profile: Profile) -> Weights:
        return resolve_pretrained(profile.pretrained, source=self.source, standins_dir=self.standins_dir,
                                  weights=self.weights)
