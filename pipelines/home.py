"""``DAGSTER_HOME`` for this checkout: ``.dagster_home/`` (gitignored) holding a copy of the versioned dagster.yaml.

``python -m pipelines.home`` creates it and prints its absolute path (``export DAGSTER_HOME=$(...)``), so a fresh
clone keeps run history, pool limits and sensor cursors without any manual setup.
"""
import os
import shutil
from pathlib import Path

from pipelines.resources import PROJECT_ROOT

HOME_ENV = "DAGSTER_HOME"
DEFAULT_HOME = PROJECT_ROOT / ".dagster_home"
INSTANCE_CONFIG = PROJECT_ROOT / "dagster.yaml"


def ensure_dagster_home(home: str | os.PathLike | None = None) -> Path:
    """Create the home (``home``, else ``$DAGSTER_HOME``, else ``.dagster_home/``) with dagster.yaml if missing;
    returns its absolute path. An existing dagster.yaml there is left alone (it may be customised)."""
    path = Path(home or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    target = path / "dagster.yaml"
    if not target.exists():
        shutil.copyfile(INSTANCE_CONFIG, target)
    return path


if __name__ == "__main__":
    print(ensure_dagster_home())
