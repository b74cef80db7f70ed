"""The ``_SUCCESS.json`` manifest: written last, its presence means the stage output is complete."""
from __future__ import annotations

import datetime as _dt
from typing import Any

from storage import fs

SUCCESS = "_SUCCESS.json"


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def success_url(out_url: str) -> str:
    return fs.join(out_url, SUCCESS)


def write_success(out_url: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Commit the stage: atomically write ``out_url/_SUCCESS.json``. Call it as the LAST step, after every
    output it names is written. Adds ``created`` (ISO UTC) if missing; returns the manifest as written."""
    written = dict(manifest)
    written.setdefault("created", utc_now_iso())
    fs.write_json(success_url(out_url), written)
    return written


def read_success(out_url: str) -> dict[str, Any] | None:
    """The stored manifest, or None when the stage has not completed."""
    try:
        return fs.read_json(success_url(out_url))
    except FileNotFoundError:
        return None


def is_complete(out_url: str) -> bool:
    return fs.exists(success_url(out_url))
