"""Find pretrained weights on disk: an explicit local path, then the Hugging Face cache, then (if allowed) the hub.

Nothing is downloaded unless the caller allows it *and* the hub is not switched off (``HF_HUB_OFFLINE``). When
no copy is found the error says which file is expected, where to put it, and which config field points at it.
"""
from __future__ import annotations

import os
from pathlib import Path


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are missing; the message says which file, where to place it, and which field to set."""


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE`` set to a true value)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hf(repo: str, filename: str | None, *, cache_dir: str | None, local_only: bool) -> str:
    import huggingface_hub

    if filename is None:  # a whole folder (diffusers layout)
        return huggingface_hub.snapshot_download(repo, cache_dir=cache_dir, local_files_only=local_only)
    return huggingface_hub.hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=local_only)


def resolve_weights(
    name: str,
    *,
    local_path: str | os.PathLike | None = None,
    hf_repo: str | None = None,
    hf_filename: str | None = None,
    expected: str | None = None,
    config_field: str | None = None,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """Return a local path (file, or folder when ``hf_filename`` is None) holding the weights of ``name``.

    Order: ``local_path`` (must exist if given: a wrong explicit path is an error, not a reason to fall back),
    the Hugging Face cache (``local_files_only``), then the hub when ``allow_download`` and not offline.
    ``expected`` describes the file for the error message (default: ``hf_filename`` or "weights folder");
    ``config_field`` is the setting that takes a local path (default ``<name>.path``).
    """
    expected = expected or hf_filename or f"{name} weights folder"
    config_field = config_field or f"{name}.path"
    if local_path is not None:
        path = Path(local_path).expanduser()
        if path.exists():
            return str(path)
        raise WeightsNotFoundError(
            f"{name}: {config_field} = {str(local_path)!r} does not exist. Expected {expected} there; "
            f"place the file at that path or point {config_field} at it."
        )
    tried = []
    if hf_repo is not None:
        cache = str(cache_dir) if cache_dir is not None else None
        try:
            return _from_hf(hf_repo, hf_filename, cache_dir=cache, local_only=True)
        except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError; bad repo ids are ValueErrors
            tried.append(f"the Hugging Face cache ({cache or 'HF_HUB_CACHE'}) for {hf_repo}")
        if allow_download and not hub_offline():
            return _from_hf(hf_repo, hf_filename, cache_dir=cache, local_only=False)
        tried.append("the hub (" + ("HF_HUB_OFFLINE is set" if hub_offline() else "downloads not allowed") + ")")
    where = f" from {hf_repo}" + (f" (file {hf_filename})" if hf_filename else "") if hf_repo else ""
    looked = "; looked in " + ", ".join(tried) if tried else ""
    raise WeightsNotFoundError(
        f"{name}: pretrained weights not found{looked}. Expected {expected}{where}. Download it on a machine "
        f"with network access, copy it to this machine (any directory), and set {config_field} to its path"
        + (f" (or place it in the Hugging Face cache, e.g. `huggingface-cli download {hf_repo}"
           + (f" {hf_filename}" if hf_filename else "") + "`)" if hf_repo else "")
        + "."
    )
