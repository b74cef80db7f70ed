"""Per-part done markers (``out_url/_parts/<name>.json``) so an interrupted stage resumes where it stopped.

A worker writes a part's data first, then ``mark``s it; a marker therefore always points at committed data.
"""
from __future__ import annotations

import re
from typing import Any

from storage import fs

PARTS_DIR = "_parts"
_MARKER_SUFFIX = ".json"
_VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


class PartMarkers:
    def __init__(self, out_url: str):
        self.out_url = out_url
        self.dir_url = fs.join(out_url, PARTS_DIR)

    def _url(self, name: str) -> str:
        if not _VALID_NAME.match(name) or name.endswith(_MARKER_SUFFIX):
            raise ValueError(f"part name {name!r} must match {_VALID_NAME.pattern} and not end in .json "
                             "(e.g. 'shard-000003' or 'chunk-12')")
        return fs.join(self.dir_url, name + _MARKER_SUFFIX)

    def done(self, name: str) -> bool:
        return fs.exists(self._url(name))

    def mark(self, name: str, info: dict[str, Any] | None = None) -> None:
        """Record ``name`` as finished. Call only after the part's data is committed."""
        fs.write_json(self._url(name), info or {})

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return fs.read_json(self._url(name))
        except FileNotFoundError:
            return None

    def all(self) -> dict[str, dict[str, Any]]:
        """{name: info} for every finished part."""
        result = {}
        for url in fs.ls(self.dir_url):
            name = fs.basename(url)
            if name.endswith(_MARKER_SUFFIX) and not name.startswith("."):  # skip in-flight temp files
                result[name[: -len(_MARKER_SUFFIX)]] = fs.read_json(url)
        return result
