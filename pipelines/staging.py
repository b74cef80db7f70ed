"""The one caching mechanism every stage asset uses.

fingerprint = hash(stage code version, resolved config, upstream fingerprints); output dir
``<root>/<stage>/<fingerprint>/``. If ``_SUCCESS.json`` is there the stored manifest is returned at once (metadata
``cached=True``, ``DataVersion(fingerprint)``); otherwise the stage program runs as a Pipes subprocess (it
resumes from its own part markers / checkpoints) and its manifest is read back from storage.

What is hashed: the stage's config values with ``${pretrained.*}`` replaced by the weights' identity (not their
local path) and without ``out_url`` or upstream URIs (the upstream fingerprints stand for those), so the same
work has the same fingerprint on every machine and storage root.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import dagster as dg

from pipelines import checks, metadata
from pipelines.locks import StageBusyError, exclusive_output
from pipelines.pretrained import Weights
from pipelines.profiles import Profile, substitute, validate_profile
from pipelines.resources import ComputeResource, PretrainedResource, ProfileResource, StorageResource
from pipelines.stages import STAGES, StageSpec
from storage import fs
from storage.fingerprint import fingerprint
from storage.manifest import read_success


@dataclass(frozen=True)
class StagePlan:
    spec: StageSpec
    fingerprint: str
    out_url: str
    values: dict[str, Any]          # profile values, ${compute.*} filled, ${pretrained.*} still open
    inputs: dict[str, str]          # config field -> upstream URI
    upstream: dict[str, str]        # upstream asset -> fingerprint

    def config(self, weights: Weights) -> dict[str, Any]:
        """What the stage program gets: weights' local paths, upstream URIs and ``out_url`` filled in."""
        resolved = substitute(self.values, {"pretrained": weights.paths()})
        return {**resolved, **self.inputs, "out_url": self.out_url}


def plan_stage(spec: StageSpec, values: dict[str, Any], compute: dict[str, Any], weights: Weights,
               upstream_manifests: dict[str, dict[str, Any]], root: str, locations: dict[str, str] | None = None,
               extra_upstream: dict[str, str] | None = None) -> StagePlan:
    """A stage's fingerprint and output dir from its profile values and upstream manifests (no I/O).

    ``locations`` are more config fields that point at storage (passed, not hashed); ``extra_upstream`` are
    more fingerprints they stand for (hashed), e.g. the training run and step of a checkpoint."""
    missing = sorted(set(spec.inputs.values()) - set(upstream_manifests))
    if missing:
        raise ValueError(f"stage {spec.asset}: upstream manifest(s) {missing} not given")
    values = substitute(values, {"compute": compute}, keep_unknown=True)
    hashed = substitute(values, {"pretrained": weights.identity})
    upstream = {name: str(upstream_manifests[name]["fingerprint"]) for name in dict.fromkeys(spec.inputs.values())}
    upstream.update(extra_upstream or {})
    fp = fingerprint(spec.asset, spec.code_version, hashed, upstream)
    # A profile may set an input field itself (e.g. fid_reference.shards_url: "" to use an ADM npz instead).
    inputs = {field: str(upstream_manifests[name]["uri"]) for field, name in spec.inputs.items()
              if field not in values}
    return StagePlan(spec=spec, fingerprint=fp, out_url=fs.join(root, spec.asset, fp), values=values,
                     inputs={**inputs, **(locations or {})}, upstream=upstream)


@contextlib.contextmanager
def _known_unstable_apis() -> Iterator[None]:
    """Silence Dagster's beta/preview notices for the two APIs this module relies on on purpose (a custom
    ``data_version`` on ``Output``, and Pipes internals): one warning per step would drown the stage logs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        warnings.simplefilter("ignore", dg.PreviewWarning)
        yield


def _reported_metadata(invocation: Any) -> dict[str, Any]:
    for result in invocation.get_results():
        if isinstance(result, dg.MaterializeResult):
            return dict(result.metadata or {})
    return {}


def run_stage(context: dg.AssetExecutionContext, plan: StagePlan, weights: Weights,
              compute_resource: ComputeResource, compute: dict[str, Any]
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the stage program through Pipes; returns (its manifest from storage, the metadata it reported)."""
    config = plan.config(weights)
    command = compute_resource.command(plan.spec.module, json.dumps(config, sort_keys=True),
                                       distributed=plan.spec.gpu, settings=compute)
    context.log.info(f"{plan.spec.asset}: running {plan.spec.module} into {plan.out_url}")
    with _known_unstable_apis():
        invocation = compute_resource.client().run(
            context=context, command=command,
            extras={"fingerprint": plan.fingerprint, "out_url": plan.out_url, "stage": plan.spec.asset})
    manifest = read_success(plan.out_url)
    if manifest is None:
        raise dg.Failure(description=f"{plan.spec.module} exited successfully but wrote no "
                                     f"{plan.out_url}/_SUCCESS.json; the stage program is broken")
    return manifest, _reported_metadata(invocation)


def cached_or_run(context: dg.AssetExecutionContext, plan: StagePlan, weights: Weights,
                  compute_resource: ComputeResource, compute: dict[str, Any],
                  expected_counts: dict[str, Any]) -> Iterator[Any]:
    """The stored manifest if the stage is complete, else run it; yields the Output and the asset's checks."""
    asset = context.asset_key.to_user_string()
    try:
        with exclusive_output(plan.out_url):
            manifest = read_success(plan.out_url)
            cached = manifest is not None
            if cached:
                context.log.info(f"{asset}: cached at {plan.out_url}, nothing to do")
                shown = metadata.to_dagster(metadata.manifest_metadata(manifest))
            else:
                manifest, shown = run_stage(context, plan, weights, compute_resource, compute)
                if not shown:  # a stage program that reported nothing: derive the same metadata here
                    shown = metadata.to_dagster(metadata.manifest_metadata(manifest))
    except StageBusyError as busy:
        raise dg.Failure(description=str(busy)) from None
    shown.update(cached=dg.MetadataValue.bool(cached), fingerprint=dg.MetadataValue.text(plan.fingerprint))
    with _known_unstable_apis():
        output = dg.Output(manifest, metadata=shown, data_version=dg.DataVersion(plan.fingerprint))
    yield output
    yield from checks.evaluate(asset, manifest, expected_counts)


@dataclass(frozen=True)
class StageContext:
    """What every stage asset resolves from its resources before planning."""
    profile: Profile
    root: str
    compute: dict[str, Any]
    weights: Weights


def stage_context(storage: StorageResource, profile_resource: ProfileResource, compute_resource: ComputeResource,
                  pretrained: PretrainedResource) -> StageContext:
    """Load and validate the profile (raises ``ConfigError`` before any work) and resolve the resources."""
    profile = profile_resource.load()
    root = storage.url
    validate_profile(profile, root)
    weights = pretrained.resolve(profile)
    weights.identity  # noqa: B018 - a missing weights file fails here, before any stage runs
    return StageContext(profile=profile, root=root, compute=compute_resource.settings(profile), weights=weights)


def materialize_stage(context: dg.AssetExecutionContext, spec: StageSpec, ctx: StageContext,
                      upstream_manifests: dict[str, dict[str, Any]], compute_resource: ComputeResource,
                      profile_stage: str | None = None, overrides: dict[str, Any] | None = None,
                      locations: dict[str, str] | None = None,
                      extra_upstream: dict[str, str] | None = None) -> Iterator[Any]:
    """Plan a stage from the profile's values of ``profile_stage`` (default: the stage itself) plus
    ``overrides``, then cached-or-run it. The asset's checks expect the counts of the profile stage."""
    profile_stage = profile_stage or spec.asset
    values = {**ctx.profile.stage_values(profile_stage), **(overrides or {})}
    plan = plan_stage(spec, values, ctx.compute, ctx.weights, upstream_manifests, ctx.root, locations,
                      extra_upstream)
    yield from cached_or_run(context, plan, ctx.weights, compute_resource, ctx.compute,
                             ctx.profile.expect.get(profile_stage, {}))
