"""What every stage program does first: a stage directory that holds ``_SUCCESS.json`` is finished work."""
from __future__ import annotations

from typing import Any

from sfd_core.reporting import log
from storage.manifest import read_success


def finished_manifest(stage: str, out_url: str) -> dict[str, Any] | None:
    """The stored manifest when ``out_url`` is complete (the stage then returns it and does nothing), else None."""
    done = read_success(out_url)
    if done is not None:
        log(f"{stage}: {out_url} is complete; nothing to do")
    return done
