"""Read and write network weights in the formats this project meets.

- official SFD/LightningDiT ``.pt``: a bare (EMA) state dict, or ``{'model', 'ema', 'opt', 'config'}`` (the EMA
  weights are preferred); keys may carry ``module.`` prefixes from DDP/accelerate wrapping;
- official SemVAE ``semantic_ae_final.pt``: ``{'model_state_dict', 'optimizer_state_dict', ..., 'config'}``;
- our own ``.safetensors`` with string metadata (``save_weights``).
Paths may be local or any URL ``storage.fs`` handles (``s3://...`` with the project's endpoint and credential
settings, retries, atomic writes). Local files are read in place (safetensors memory-mapped), remote ones whole.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
from typing import Any, Mapping

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save as safetensors_save
from torch import nn

from sfd_core.reporting import log
from storage import fs

# Preferred nested entries, in order: EMA weights beat raw weights for inference.
STATE_DICT_ENTRIES = ("ema", "model_state_dict", "model", "state_dict")
# Wrapper prefixes: DDP / accelerate (``module.``) and torch.compile (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """The file cannot be read as weights, or its keys/shapes do not fit the model."""


def read_bytes(path: str) -> bytes:
    """The whole file, through ``storage.fs`` (S3 endpoint/credentials from the environment, retries)."""
    return fs.read_bytes(str(path))


def _local_path(path: str) -> str | None:
    """The filesystem path of a local path or ``file://`` URL; None for remote URLs."""
    path = str(path)
    if not fs.is_local(path):
        return None
    return path.split("://", 1)[1] if "://" in path else path


def _is_safetensors(head: bytes, size: int | None = None) -> bool:
    """Whether a file starting with ``head`` (at least 9 bytes of it) and ``size`` bytes long (default:
    ``len(head)``) is safetensors: a u64 little-endian header length, then a JSON header starting with '{'."""
    size = len(head) if size is None else size
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def load_checkpoint_object(path: str) -> Any:
    """The raw object in a weights file: a dict of tensors for safetensors, whatever was pickled for ``.pt``.

    Local files are opened in place (no copy into memory first); remote ones are read whole via ``storage.fs``."""
    local = _local_path(path)
    if local is not None:
        with open(local, "rb") as f:
            head = f.read(9)
        if _is_safetensors(head, os.path.getsize(local)):
            return safetensors_load_file(local, device="cpu")
        source: Any = local
    else:
        data = read_bytes(path)
        if _is_safetensors(data):
            return safetensors_load(data)
        source = None

    def load(weights_only: bool) -> Any:
        f = source if source is not None else io.BytesIO(data)
        return torch.load(f, map_location="cpu", weights_only=weights_only)

    try:
        return load(weights_only=True)
    except pickle.UnpicklingError:
        # Full official training checkpoints pickle an OmegaConf config, which the safe loader refuses.
        log(f"{path}: not a plain tensor pickle; loading it as a full training checkpoint (weights_only=False)")
        return load(weights_only=False)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def clean(key: str) -> str:
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        return key

    return {clean(k): v for k, v in state_dict.items()}


def extract_state_dict(obj: Any, key: str | None = None, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Pick the state dict out of a loaded checkpoint object (``key`` forces a nested entry)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{source}: no entry {key!r}; top-level keys: {sorted(map(str, obj))[:20]}")
        obj = obj[key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        entry = next((name for name in STATE_DICT_ENTRIES if isinstance(obj.get(name), Mapping)), None)
        if entry is None:
            raise CheckpointError(f"{source}: no state dict found; expected one of {list(STATE_DICT_ENTRIES)} "
                                  f"or a flat dict of tensors, top-level keys: {sorted(map(str, obj))[:20]}")
        obj = obj[entry]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        others = sorted(k for k in obj if k not in tensors)[:10]
        raise CheckpointError(f"{source}: state dict has non-tensor entries {others}")
    return strip_wrapper_prefixes(tensors)


def load_state_dict(path: str, key: str | None = None) -> dict[str, torch.Tensor]:
    return extract_state_dict(load_checkpoint_object(path), key, source=str(path))


def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_weights(model: nn.Module, path: str, key: str | None = None, strict: bool = True) -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place) and return it.

    With ``strict`` any missing or unexpected key is an error that names them; shape mismatches always are."""
    return apply_state_dict(model, load_state_dict(path, key), source=str(path), strict=strict)


def apply_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                     strict: bool = True) -> nn.Module:
    """``model.load_state_dict`` with errors that name the offending keys and shapes."""
    expected = model.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if mismatched:
        raise CheckpointError(f"{source}: shape mismatch for {_describe(mismatched)}")
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        parts = [f"missing keys: {_describe(missing)}" if missing else "",
                 f"unexpected keys: {_describe(unexpected)}" if unexpected else ""]
        raise CheckpointError(f"{source}: weights do not fit {type(model).__name__}; "
                              + "; ".join(p for p in parts if p))
    model.load_state_dict(dict(state_dict), strict=False)
    return model


def save_weights(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str,
                 metadata: Mapping[str, Any] | None = None) -> None:
    """Write a safetensors file (local path or ``storage.fs`` URL). Non-string metadata values are JSON-encoded."""
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in strip_wrapper_prefixes(state).items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    # storage.fs: local writes go to a temp file and are renamed (a reader never sees a half-written file),
    # remote ones are a single PUT with the project's S3 settings.
    fs.write_bytes(str(path), safetensors_save(tensors, metadata=meta))


def read_weights_metadata(path: str) -> dict[str, str]:
    """String metadata of a safetensors file written by ``save_weights`` (reads only the header)."""
    with fs.open(str(path), "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        header = f.read(header_len) if header_len < 100_000_000 else b""
    if not header.startswith(b"{"):
        raise CheckpointError(f"{path}: not a safetensors file")
    return json.loads(header).get("__metadata__", {}) or {}
