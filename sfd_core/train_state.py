"""Resumable training checkpoints: one folder per step, committed by a marker written last.

Layout (local path or any storage URL)::

    <ckpt_dir>/step_0012000/model.safetensors   trained weights
                           ema.safetensors     EMA weights (optional)
                           state.pt            optimizer, scheduler, step, RNG states, loader position, ...
                           _COMPLETE.json      written LAST: the folder counts only once this exists

A folder without ``_COMPLETE.json`` is a write that was interrupted: readers ignore it and ``clean_incomplete``
deletes it. ``state.pt`` holds only tensors and plain Python values, so it loads with ``weights_only=True``.
"""
from __future__ import annotations

import io
import math
import os
import random
import re
import tempfile
from typing import Any, Callable, Mapping

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from torch import nn

from sfd_core import distributed
from sfd_core.checkpoints import apply_state_dict, save_weights, strip_wrapper_prefixes
from sfd_core.reporting import log
from storage import fs
from storage.manifest import utc_now_iso

COMPLETE = "_COMPLETE.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_url(ckpt_dir: str, step: int) -> str:
    return fs.join(ckpt_dir, step_dir_name(step))


def _step_folders(ckpt_dir: str) -> dict[int, str]:
    """{step: url} of every step folder, complete or not."""
    found = {}
    for url in fs.ls(ckpt_dir):
        match = _STEP_DIR.match(fs.basename(url))
        if match:
            found[int(match.group(1))] = url
    return found


def is_complete(url: str) -> bool:
    return fs.exists(fs.join(url, COMPLETE))


def complete_steps(ckpt_dir: str) -> list[int]:
    """Steps of the committed checkpoints, ascending."""
    return sorted(step for step, url in _step_folders(ckpt_dir).items() if is_complete(url))


def latest_complete(ckpt_dir: str) -> str | None:
    """URL of the newest committed checkpoint folder, or None."""
    steps = complete_steps(ckpt_dir)
    return checkpoint_url(ckpt_dir, steps[-1]) if steps else None


def step_of(url: str) -> int:
    match = _STEP_DIR.match(fs.basename(url))
    if not match:
        raise ValueError(f"{url} is not a checkpoint folder (expected .../step_NNNNNNN)")
    return int(match.group(1))


# --------------------------------------------------------------------------------------------- writing

def commit_file(url: str, write_local: Callable[[str], None]) -> None:
    """Make the file at ``url`` atomically with ``write_local(path)``, any writer of local files: it writes a
    temp file that is then renamed into place (local URLs) or uploaded in one piece (remote URLs, through
    storage, which knows the endpoint settings). Large state is streamed to disk, never held as bytes."""
    if fs.is_local(url):
        path = fs.filesystem(url)[1]
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=directory)
        os.close(fd)
        try:
            write_local(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory() as tmp_dir:
        local = os.path.join(tmp_dir, fs.basename(url))
        write_local(local)
        fs.put_file(local, url)


def _write_weights(module_or_state: nn.Module | Mapping[str, torch.Tensor], url: str) -> None:
    commit_file(url, lambda path: save_weights(module_or_state, path))


def save_checkpoint(ckpt_dir: str, step: int, model: nn.Module | Mapping[str, torch.Tensor],
                    state: Mapping[str, Any], ema: nn.Module | Mapping[str, torch.Tensor] | None = None,
                    info: Mapping[str, Any] | None = None) -> str:
    """Write ``step_%07d/`` (weights, EMA, state) and commit it with ``_COMPLETE.json``; returns its URL.

    Call from one rank only. A leftover folder of the same step (an earlier interrupted write) is replaced."""
    url = checkpoint_url(ckpt_dir, step)
    if fs.exists(url):
        fs.rm(url, recursive=True)
    files = [MODEL_FILE, STATE_FILE]
    _write_weights(model, fs.join(url, MODEL_FILE))
    if ema is not None:
        _write_weights(ema, fs.join(url, EMA_FILE))
        files.append(EMA_FILE)
    commit_file(fs.join(url, STATE_FILE), lambda path: torch.save(dict(state), path))
    fs.write_json(fs.join(url, COMPLETE), {"step": step, "files": sorted(files), "created": utc_now_iso(),
                                           **dict(info or {})})
    return url


# --------------------------------------------------------------------------------------------- reading

def read_weights(url: str) -> dict[str, torch.Tensor]:
    """A safetensors file at any storage URL as a state dict (wrapper prefixes stripped)."""
    return strip_wrapper_prefixes(safetensors_load(fs.read_bytes(url)))


def load_model_weights(model: nn.Module, ckpt_url: str, which: str = MODEL_FILE) -> nn.Module:
    """Strictly load ``model.safetensors`` (or ``which=EMA_FILE``) of a checkpoint folder into ``model``."""
    path = fs.join(ckpt_url, which)
    return apply_state_dict(model, read_weights(path), source=path)


def load_state(ckpt_url: str) -> dict[str, Any]:
    """The ``state.pt`` dict of a checkpoint folder (loaded on CPU, tensors and plain values only)."""
    return torch.load(io.BytesIO(fs.read_bytes(fs.join(ckpt_url, STATE_FILE))), map_location="cpu",
                      weights_only=True)


# --------------------------------------------------------------------------------------- housekeeping

def clean_incomplete(ckpt_dir: str) -> list[int]:
    """Delete step folders that were never committed (an interrupted write); returns their steps.

    Call only while no other process is writing checkpoints into ``ckpt_dir`` (i.e. at start-up, rank 0)."""
    removed = []
    for step, url in sorted(_step_folders(ckpt_dir).items()):
        if not is_complete(url):
            fs.rm(url, recursive=True)
            removed.append(step)
    return removed


def steps_to_keep(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The newest ``keep_last`` steps, every multiple of ``keep_every`` (0 = none), and always the newest."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is always kept), got {keep_last}")
    ordered = sorted(steps)
    keep = set(ordered[-keep_last:])
    if keep_every > 0:
        keep |= {s for s in ordered if s % keep_every == 0}
    return keep


def apply_retention(ckpt_dir: str, keep_last: int, keep_every: int = 0) -> list[int]:
    """Delete committed checkpoints outside ``steps_to_keep``; returns the deleted steps.

    The marker goes first, so a deletion cut short leaves an (ignored) incomplete folder, never a
    'complete' folder with missing files."""
    steps = complete_steps(ckpt_dir)
    keep = steps_to_keep(steps, keep_last, keep_every)
    removed = []
    for step in steps:
        if step not in keep:
            url = checkpoint_url(ckpt_dir, step)
            fs.rm(fs.join(url, COMPLETE))
            fs.rm(url, recursive=True)
            removed.append(step)
    return removed


# ------------------------------------------------------------------------------------------ RNG states

def capture_rng_state() -> dict[str, Any]:
    """Global RNG states of python, numpy, torch CPU and every CUDA device, as tensors and plain values."""
    kind, key, pos, has_gauss, cached_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached_gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ loss curve

class LossCurve:
    """(step, value) points logged during a run; part of the checkpoint so a resumed run keeps its history."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: list[float] = []

    def record(self, step: int, value: float) -> None:
        self.steps.append(int(step))
        self.values.append(float(value))

    def state_dict(self) -> dict[str, list]:
        return {"steps": list(self.steps), "values": list(self.values)}

    def load_state_dict(self, state: Mapping[str, list]) -> None:
        self.steps, self.values = [int(s) for s in state["steps"]], [float(v) for v in state["values"]]

    def summary(self, max_points: int = 200) -> dict[str, Any]:
        """First/last/min values and the curve thinned to at most ``max_points`` evenly spaced points."""
        if not self.values:
            return {"points": 0}
        stride = max(1, math.ceil(len(self.values) / max_points))
        keep = list(range(0, len(self.values), stride))
        if keep[-1] != len(self.values) - 1:
            keep.append(len(self.values) - 1)
        return {"points": len(self.values), "first": self.values[0], "last": self.values[-1],
                "min": min(self.values), "steps": [self.steps[i] for i in keep],
                "values": [self.values[i] for i in keep]}


# ------------------------------------------------------------------------------- per-stream randomness

def stream_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, 2, stream]).generate_state(1)[0])


class StreamGenerators:
    """One torch.Generator per data stream this rank serves (see ``sfd_core.latent_data``): all randomness of
    a micro-batch comes from its stream's generator, so results do not depend on which rank ran it."""

    def __init__(self, seed: int, streams: range | list[int], device: torch.device | str = "cpu"):
        self.generators = {s: torch.Generator(device=device).manual_seed(stream_seed(seed, s)) for s in streams}

    def ordered(self) -> list[torch.Generator]:
        return [self.generators[s] for s in sorted(self.generators)]

    def gather_state(self) -> dict[str, Any]:
        """Collective: {"streams": {stream: state} of all ranks, "rng": [global RNG state of each rank]}."""
        gathered = distributed.all_gather_object({"streams": {s: g.get_state() for s, g in self.generators.items()},
                                      "rng": capture_rng_state()})
        return {"streams": {s: st for part in gathered for s, st in part["streams"].items()},
                "rng": [part["rng"] for part in gathered]}

    def restore(self, state: Mapping[str, Any], rank: int, world_size: int) -> None:
        """Set this rank's stream generators (any world size) and, for the same world size, its global RNGs."""
        for s, generator in self.generators.items():
            generator.set_state(state["streams"][s])
        if len(state["rng"]) == world_size:
            restore_rng_state(state["rng"][rank])


class MetricWindow:
    """Sums of per-step metric vectors since the last log line, kept on the device (no host sync per step)."""

    def __init__(self, size: int, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(size, device=device)
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        self.sums += values
        self.count += 1

    def reduce(self) -> list[float]:
        """Collective: means over the window and over ranks; starts a new window."""
        means = (distributed.all_reduce_mean(self.sums) / max(self.count, 1)).tolist()
        self.sums.zero_()
        self.count = 0
        return means

    def state_dict(self) -> dict[str, Any]:
        """Collective. Means are linear, so the rank-mean of the sums resumes the window exactly."""
        return {"sums": distributed.all_reduce_mean(self.sums).cpu(), "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums = state["sums"].to(self.sums.device)
        self.count = int(state["count"])


# ------------------------------------------------------------------------------------------ a training run

class RunCheckpoints:
    """The checkpoint folders of one training run and the run state every trainer carries besides its model and
    optimizer: per-stream generators, the open log window, the loss curve and the data position.

    ``resume`` and ``save`` are collectives (every rank calls them); only rank 0 writes."""

    def __init__(self, ckpt_dir: str, rank: int, world_size: int, num_streams: int, generators: StreamGenerators,
                 window: MetricWindow, curve: LossCurve, keep_last: int, keep_every: int = 0):
        self.ckpt_dir, self.rank, self.world_size, self.num_streams = ckpt_dir, rank, world_size, num_streams
        self.generators, self.window, self.curve = generators, window, curve
        self.keep_last, self.keep_every = keep_last, keep_every
        self.last_saved = -1

    def resume(self) -> tuple[str, dict[str, Any]] | None:
        """Drop interrupted folders, then restore the run state of the newest complete checkpoint. Returns
        (its URL, its state: "step", "data" position, "optimizer", trainer extras) or None for a fresh run."""
        if self.rank == 0:
            removed = clean_incomplete(self.ckpt_dir)
            if removed:
                log(f"{self.ckpt_dir}: removed incomplete checkpoint folder(s) of step(s) {removed}")
        distributed.barrier()
        latest = latest_complete(self.ckpt_dir)
        if latest is None:
            return None
        state = load_state(latest)
        if int(state["num_streams"]) != self.num_streams:
            raise ValueError(f"{latest} was written with {state['num_streams']} data streams; resume with "
                             f"data_streams={state['num_streams']}")
        self.generators.restore(state["generators"], self.rank, self.world_size)
        self.window.load_state_dict(state["log_window"])
        self.curve.load_state_dict(state["loss_curve"])
        self.last_saved = int(state["step"])
        return latest, state

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, data_position: Mapping[str, int],
             ema: nn.Module | None = None, extra: Mapping[str, Any] | None = None,
             info: Mapping[str, Any] | None = None) -> str:
        """Checkpoint ``step`` (then apply retention); returns the folder URL."""
        run_state = {"generators": self.generators.gather_state(), "log_window": self.window.state_dict()}
        url = checkpoint_url(self.ckpt_dir, step)
        if self.rank == 0:
            state = {"step": step, "optimizer": optimizer.state_dict(), "data": dict(data_position),
                     "world_size": self.world_size, "num_streams": self.num_streams,
                     "loss_curve": self.curve.state_dict(), **run_state, **dict(extra or {})}
            save_checkpoint(self.ckpt_dir, step, model, state, ema=ema, info=info)
            apply_retention(self.ckpt_dir, self.keep_last, self.keep_every)
        distributed.barrier()
        self.last_saved = step
        return url
