"""Builds the Dagster asset of one stage from the stage table; every stage asset is made here, the same way."""

from typing import Any, Iterator

import dagster as dg

from pipelines import checks
from pipelines.resources import ComputeResource, PretrainedResource, ProfileResource, StorageResource
from pipelines.staging import materialize_stage, stage_context
from pipelines.stages import StageSpec

GPU_POOL = "gpu"
GPU_TAG = {"sfd/gpu": "exclusive"}   # executor tag limit 1: one GPU stage at a time inside a run
IMAGENET_SOURCE = "imagenet_source"

imagenet_source = dg.AssetSpec(
    IMAGENET_SOURCE, group_name="data", kinds={"file"},
    description="External: an ImageNet-style folder (train/<wnid>/*.JPEG), a tar, or builtin:tiny; set by the "
                "profile's stages.imagenet_shards.source.")


def gpu_options(gpu: bool) -> dict[str, Any]:
    """Pool and op tags of a stage that needs the accelerator (both limit it to one at a time)."""
    return {"pool": GPU_POOL, "op_tags": dict(GPU_TAG)} if gpu else {}


def stage_asset(spec: StageSpec) -> dg.AssetsDefinition:
    """The asset that builds ``spec`` (its upstream manifests come in through the JSON IO manager)."""
    stage = spec.asset

    @dg.asset(name=stage, group_name=spec.group, description=spec.description, code_version=spec.code_version,
              ins={name: dg.AssetIn(key=name) for name in dict.fromkeys(spec.inputs.values())},
              deps=[IMAGENET_SOURCE] if not spec.inputs else [], check_specs=checks.check_specs(stage),
              kinds={"pytorch"} if spec.gpu else {"python"}, **gpu_options(spec.gpu))
    def _stage(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
               compute: ComputeResource, pretrained: PretrainedResource, **upstream: dict) -> Iterator[Any]:
        ctx = stage_context(storage, profile, compute, pretrained)
        yield from materialize_stage(context, spec, ctx, upstream, compute)

    return _stage
