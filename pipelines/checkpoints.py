"""Finding sfd_model checkpoints for per-checkpoint evaluation, while training runs or after it ended.

A checkpoint is ``<sfd_model dir>/checkpoints/step_%07d/`` and counts once its ``_COMPLETE.json`` exists (the
layout of ``sfd_core.train_state``, repeated here because that module imports torch). The sfd_model dir is found
by planning the stage from the stored upstream manifests and the current profile, so checkpoints of a run still
in progress are found too. A checkpoint's partition key is ``<model fingerprint>-step_%07d``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import dagster as dg

from pipelines.io_manager import manifest_store_url
from pipelines.staging import StageContext, plan_stage
from pipelines.stages import STAGES, upstream_assets
from storage import fs

MODEL_STAGE = "sfd_model"
CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "_COMPLETE.json"
PARTITIONS_NAME = "sfd_checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_KEY = re.compile(r"^([0-9a-f]{16})-(step_\d{7,})$")

checkpoint_partitions = dg.DynamicPartitionsDefinition(name=PARTITIONS_NAME)


@dataclass(frozen=True)
class Checkpoint:
    model_fingerprint: str
    step_dir: str          # "step_0000100"
    url: str

    @property
    def key(self) -> str:
        return f"{self.model_fingerprint}-{self.step_dir}"

    @property
    def step(self) -> int:
        return int(self.step_dir.removeprefix("step_"))


def parse_key(key: str) -> tuple[str, str]:
    """(model fingerprint, step dir) of a partition key."""
    match = _KEY.match(key)
    if not match:
        raise ValueError(f"partition key {key!r} is not '<16 hex model fingerprint>-step_NNNNNNN'")
    return match.group(1), match.group(2)


def model_dir(root: str, model_fingerprint: str) -> str:
    return fs.join(root, STAGES[MODEL_STAGE].asset, model_fingerprint)


def complete_checkpoints(model_url: str, model_fingerprint: str) -> list[Checkpoint]:
    """Committed checkpoints of one training run, oldest first."""
    ckpt_dir = fs.join(model_url, CHECKPOINTS_DIR)
    if not fs.exists(ckpt_dir):
        return []
    found = []
    for url in fs.ls(ckpt_dir):
        name = fs.basename(url)
        if _STEP_DIR.match(name) and fs.exists(fs.join(url, COMPLETE)):
            found.append(Checkpoint(model_fingerprint, name, url))
    return sorted(found, key=lambda c: c.step)


def current_model_fingerprint(ctx: StageContext) -> str | None:
    """The fingerprint sfd_model has under the current profile, or None while its upstream is not built."""
    upstream = {}
    for name in upstream_assets(MODEL_STAGE):
        url = manifest_store_url(ctx.root, name)
        if not fs.exists(url):
            return None
        upstream[name] = fs.read_json(url)
    plan = plan_stage(STAGES[MODEL_STAGE], ctx.profile.stage_values(MODEL_STAGE), ctx.compute, ctx.weights,
                      upstream, ctx.root)
    return plan.fingerprint


def newest_checkpoint(ctx: StageContext) -> Checkpoint | None:
    fp = current_model_fingerprint(ctx)
    if fp is None:
        return None
    found = complete_checkpoints(model_dir(ctx.root, fp), fp)
    return found[-1] if found else None


@dataclass(frozen=True)
class CheckpointSource:
    """How the sampler gets one checkpoint: its weights file and the sfd_core.generate fields of the model."""
    weights_url: str
    spec: dict


# What sfd_core.train_sfd records in a checkpoint's _COMPLETE.json ("info") for evaluation during training.
MODEL_INFO_KEYS = ("model", "delta_t", "latent_multiplier")
EMA_FILE, MODEL_FILE = "ema.safetensors", "model.safetensors"


def checkpoint_source(root: str, model_fingerprint: str, step_dir: str) -> CheckpointSource:
    url = fs.join(model_dir(root, model_fingerprint), CHECKPOINTS_DIR, step_dir)
    try:
        info = fs.read_json(fs.join(url, COMPLETE))
    except FileNotFoundError:
        raise dg.Failure(description=f"checkpoint {url} is not committed (no {COMPLETE}) or was retired") from None
    missing = [key for key in MODEL_INFO_KEYS if key not in info]
    if not missing and not (info["model"] or {}).get("name"):
        missing = ["model.name"]
    if missing:
        raise dg.Failure(description=f"{url}/{COMPLETE} lacks {missing}: sfd_core.train_sfd must record the model "
                                     f"(name, overrides), delta_t and latent_multiplier with each checkpoint")
    weights = EMA_FILE if EMA_FILE in info.get("files", []) else MODEL_FILE
    spec = {"model_name": info["model"]["name"], "model_overrides": dict(info["model"].get("overrides") or {}),
            "delta_t": float(info["delta_t"]), "latent_multiplier": float(info["latent_multiplier"])}
    return CheckpointSource(weights_url=fs.join(url, weights), spec=spec)
