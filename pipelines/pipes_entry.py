"""Run a stage program under Dagster Pipes:
``[torchrun ...] python -m pipelines.pipes_entry sfd_core.<stage> --config <json> [--set k=v ...]``.

Rank 0 opens the Pipes channel, forwards the stage's log lines and metrics (``sfd_core.reporting``) to Dagster,
runs ``run(cfg)`` and reports one materialization with the manifest's metadata. Other ranks just run. Launched
outside Dagster (no Pipes environment) it is the plain stage program.

Imports only ``dagster_pipes`` (not ``dagster``), so it works in a trainer image that lacks the orchestrator.
"""
from __future__ import annotations

import ctypes
import importlib
import math
import os
import signal
import sys
from typing import Any, Sequence

from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, PipesContext, open_dagster_pipes

from pipelines.metadata import manifest_metadata
from sfd_core.config import load_config
from sfd_core.reporting import Reporter, is_rank_zero, set_reporter

_PR_SET_PDEATHSIG = 1


class PipesReporter(Reporter):
    """Sends stage log lines and metrics to Dagster; keeps the last value of every metric for the report."""

    def __init__(self, pipes: PipesContext):
        self.pipes = pipes
        self.last_metrics: dict[str, float] = {}
        self.last_step: int | None = None

    def log(self, message: str) -> None:
        self.pipes.log.info(message)

    def metric(self, step: int, values: dict[str, float]) -> None:
        self.last_step = step
        self.last_metrics.update(values)
        self.pipes.log.info(f"step {step}: " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))


def _die_with_parent() -> None:
    """Ask Linux to SIGINT this process when its launcher dies (a killed orchestrator must not leave a stage
    writing beside its rerun); SIGINT lets a trainer save a checkpoint first."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGINT))
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGINT)


def report_metadata(manifest: dict[str, Any], reporter: PipesReporter) -> dict[str, Any]:
    """The manifest's metadata plus the last reported training metrics as plottable numbers."""
    entries = manifest_metadata(manifest)
    for key, value in reporter.last_metrics.items():
        if math.isfinite(value) and f"metrics/{key}" not in entries:
            entries[f"last/{key}"] = {"raw_value": value, "type": "float"}
    if reporter.last_step is not None:
        entries["last/step"] = {"raw_value": int(reporter.last_step), "type": "int"}
    return entries


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        raise SystemExit("usage: python -m pipelines.pipes_entry <stage module> --config <json> [--set k=v ...]")
    module = importlib.import_module(args[0])
    cfg = load_config(module.Config, args[1:])
    if not (is_rank_zero() and os.environ.get(DAGSTER_PIPES_CONTEXT_ENV_VAR)):
        return module.run(cfg)
    _die_with_parent()
    with open_dagster_pipes() as pipes:
        reporter = PipesReporter(pipes)
        set_reporter(reporter)
        manifest = module.run(cfg)
        pipes.report_asset_materialization(metadata=report_metadata(manifest, reporter),
                                           data_version=str(manifest["fingerprint"]))
    return manifest


if __name__ == "__main__":
    main()
