"""Where a benchmark's JSON goes: ``--json PATH`` if given, else ``$OUT/<name>.json`` (the device tool's output
folder), else nowhere."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_report(report: dict[str, Any], name: str, explicit_path: str | None = None) -> str | None:
    out = explicit_path or (os.path.join(os.environ["OUT"], f"{name}.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}", flush=True)
    return out
