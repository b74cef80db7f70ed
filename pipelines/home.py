"""``DAGSTER_HOME`` for this checkout: ``.dagster_home/`` (gitignored) holding a copy of the versioned dagster.yaml.

``python -m pipelines.home`` creates it and prints its absolute path (``export DAGSTER_HOME=$(...)``), so a fresh
clone keeps run history, pool limits and sensor cursors without any manual setup.

A run executed by the CLI (no daemon) that is killed leaves its status STARTED and its "gpu" pool slot claimed,
so the next run would wait for that slot forever; ``recover_crashed_runs`` fails such runs and frees their slots.
"""
import os
import shutil
from pathlib import Path

import dagster as dg

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


def _process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a killed process not yet reaped by its new parent (a zombie) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no procfs: trust kill(0)
        return True


def recover_crashed_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail the in-progress runs of this machine whose executing process is gone and free their pool slots;
    returns their run ids. Only for an instance used from one host (the default local SQLite storage)."""
    recovered = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_START)
        pid = starts[-1].dagster_event.pid if starts else None
        if pid is None or _process_alive(pid):
            continue
        instance.report_run_failed(run, f"the process that executed this run (pid {pid}) is gone: "
                                        f"killed or crashed")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(run.run_id)
    return recovered


if __name__ == "__main__":
    print(ensure_dagster_home())
