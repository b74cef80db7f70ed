"""Asset metadata from a stage manifest, in the Dagster Pipes wire format ``{key: {"raw_value", "type"}}``.

The same function serves ``pipes_entry`` (reporting from the stage process, which may lack ``dagster``) and the
cached path of an asset (which reads the stored manifest); ``to_dagster`` turns entries into ``MetadataValue``s.
Numbers become ``int``/``float`` entries so Dagster plots them across materializations (loss, img/s, FID).
"""
from __future__ import annotations

import base64
import io
import math
from typing import Any

from storage import fs

THUMBNAIL_PX = 384
GRID_ARTIFACT = "grid"
REPORT_ARTIFACT = "report"
STANDIN_NOTE = ("Stand-in (random-init) networks were used: numbers compare only with other stand-in runs, "
                "not with the paper.")


def _entry(value: Any, kind: str) -> dict[str, Any]:
    return {"raw_value": value, "type": kind}


def _number(value: Any) -> dict[str, Any] | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return _entry(value, "int")
    return _entry(value if math.isfinite(value) else str(value), "float" if math.isfinite(value) else "text")


def _link(url: str) -> dict[str, Any]:
    return _entry(url, "path" if fs.is_local(url) else "url")


def _markdown_table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    for key, value in rows.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


def _describe_location(value: Any) -> str:
    """One table cell for an artifact: its URL, or the count and first URL of a list (e.g. 1,000 shards)."""
    if isinstance(value, (list, tuple)):
        return f"{len(value)} files, first `{value[0]}`" if value else "none"
    return f"`{value}`"


def thumbnail_markdown(png_url: str, max_px: int = THUMBNAIL_PX) -> str:
    """A small PNG as a markdown data URI (keeps event-log rows small), with a link to the full image."""
    from PIL import Image

    image = Image.open(io.BytesIO(fs.read_bytes(png_url)))
    image.thumbnail((max_px, max_px))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"![sample grid](data:image/png;base64,{data})\n\nfull size: `{png_url}`"


def manifest_metadata(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Everything a person wants to see about one stage output, from its manifest alone (plus the grid PNG)."""
    meta: dict[str, dict[str, Any]] = {
        "fingerprint": _entry(str(manifest.get("fingerprint", "")), "text"),
        "uri": _link(str(manifest.get("uri", ""))),
        "code_version": _entry(str(manifest.get("code_version", "")), "text"),
        "standins": _entry(bool(manifest.get("standins", False)), "bool"),
        "config": _entry(manifest.get("config", {}), "json"),
        "upstream": _entry(manifest.get("upstream", {}), "json"),
    }
    for group in ("counts", "stats", "metrics"):
        values = manifest.get(group) or {}
        scalars = {k: v for k, v in values.items() if _number(v) is not None}
        for key, value in scalars.items():
            meta[f"{group}/{key}"] = _number(value)
        nested = {k: v for k, v in values.items() if k not in scalars}
        if nested:
            meta[f"{group}/detail"] = _entry(nested, "json")
    metrics = {k: v for k, v in (manifest.get("metrics") or {}).items() if _number(v) is not None}
    if metrics:
        table = _markdown_table(metrics, ("metric", "value"))
        meta["metrics_table"] = _entry(table + (f"\n\n_{STANDIN_NOTE}_" if manifest.get("standins") else ""), "md")
    artifacts = manifest.get("artifacts") or {}
    if artifacts:
        meta["artifacts"] = _entry(_markdown_table({k: _describe_location(v) for k, v in artifacts.items()},
                                                   ("artifact", "location")), "md")
    if isinstance(artifacts.get(GRID_ARTIFACT), str):
        meta["sample_grid"] = _entry(thumbnail_markdown(artifacts[GRID_ARTIFACT]), "md")
    if isinstance(artifacts.get(REPORT_ARTIFACT), str) and artifacts[REPORT_ARTIFACT].endswith(".md"):
        meta["report"] = _entry(fs.read_bytes(artifacts[REPORT_ARTIFACT]).decode("utf-8"), "md")
    return meta


def to_dagster(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pipes wire-format entries as Dagster ``MetadataValue``s."""
    import dagster as dg

    makers = {"int": dg.MetadataValue.int, "float": dg.MetadataValue.float, "text": dg.MetadataValue.text,
              "json": dg.MetadataValue.json, "md": dg.MetadataValue.md, "path": dg.MetadataValue.path,
              "url": dg.MetadataValue.url, "bool": dg.MetadataValue.bool}
    return {key: makers[entry["type"]](entry["raw_value"]) for key, entry in entries.items()}
