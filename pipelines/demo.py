"""``python -m pipelines.demo``: the whole pipeline up to the FID report on one profile, then where the report is.

Runs exactly ``dagster asset materialize -m pipelines.definitions --select '+key:"fid_report"'`` (the multiprocess
executor, a persistent ``DAGSTER_HOME``), after a preflight that fails in seconds on a wrong profile, storage
root or missing weights. Rerunning is cheap: every finished stage is cached.

    python -m pipelines.demo [--profile tiny|imagenet256|my.yaml] [--root artifacts|s3://bkt/sfd] [--select ...]
"""
import argparse
import os
import subprocess
import sys
from typing import Sequence

import dagster as dg

from pipelines.home import HOME_ENV, ensure_dagster_home, recover_crashed_runs
from pipelines.io_manager import manifest_store_url
from pipelines.profiles import PROFILE_ENV, ConfigError
from pipelines.resources import (PROJECT_ROOT, STORAGE_ROOT_ENV, ComputeResource, PretrainedResource,
                                 ProfileResource, StorageResource)
from pipelines.staging import stage_context
from storage import fs

REPORT_ASSET = "fid_report"
DEFAULT_SELECTION = f'+key:"{REPORT_ASSET}"'


def preflight(profile: str | None, root: str | None) -> str:
    """Validate everything before any work; returns the resolved storage root."""
    ctx = stage_context(StorageResource(root=root), ProfileResource(name=profile), ComputeResource(),
                        PretrainedResource())
    print(f"profile {ctx.profile.name!r} ({ctx.profile.origin}), storage root {ctx.root}, "
          f"device {ctx.compute['device']}, pretrained weights: {ctx.weights.source}", flush=True)
    return ctx.root


def materialize_command(selection: str) -> list[str]:
    return [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "pipelines.definitions",
            "--select", selection]


def print_report(root: str) -> None:
    manifest = fs.read_json(manifest_store_url(root, REPORT_ASSET))
    artifacts = manifest.get("artifacts", {})
    print("\nFID report" + (" (stand-in networks: numbers compare only with each other)"
                            if manifest.get("standins") else ""))
    for key, value in sorted((manifest.get("metrics") or {}).items()):
        print(f"  {key:>24}: {value:.6g}" if isinstance(value, (int, float)) else f"  {key:>24}: {value}")
    for name in ("report", "grid", "metrics"):
        if name in artifacts:
            print(f"{name:>8}: {artifacts[name]}")
    print(f"manifest: {manifest['uri']}/_SUCCESS.json")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", help=f"built-in name or YAML path (default ${PROFILE_ENV} or tiny)")
    parser.add_argument("--root", help=f"artifact root (default ${STORAGE_ROOT_ENV} or artifacts/)")
    parser.add_argument("--select", default=DEFAULT_SELECTION, help="dagster asset selection")
    args = parser.parse_args(argv)

    home = ensure_dagster_home()
    env = {**os.environ, HOME_ENV: str(home)}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for run_id in recover_crashed_runs(instance):
            print(f"run {run_id} was killed earlier: marked failed, its GPU pool slot freed", flush=True)
    if args.profile:
        # a profile file is found from the caller's directory, wherever the CLI runs
        env[PROFILE_ENV] = os.path.abspath(args.profile) if os.path.exists(args.profile) else args.profile
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    try:
        root = preflight(env.get(PROFILE_ENV), args.root)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    env[STORAGE_ROOT_ENV] = root
    print(f"DAGSTER_HOME={home}\n$ {' '.join(materialize_command(args.select))}", flush=True)
    code = subprocess.call(materialize_command(args.select), env=env)
    if code != 0:
        print(f"materialization failed (exit code {code}); rerun to resume from the finished stages",
              file=sys.stderr)
        return code
    if fs.exists(manifest_store_url(root, REPORT_ASSET)):
        print_report(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
