"""Jobs: the whole graph, per-checkpoint evaluation, and a cheap preflight that checks the setup."""

import dagster as dg

from pipelines.assets.checkpoint_eval import CHECKPOINT_FID, CHECKPOINT_SAMPLES
from pipelines.checkpoints import checkpoint_partitions
from pipelines.resources import ComputeResource, PretrainedResource, ProfileResource, StorageResource
from pipelines.staging import stage_context

GPU_RUN_TAGS = {"sfd/gpu": "exclusive"}   # instance run-tag limit 1 (dagster.yaml): one GPU run per machine

sfd_pipeline_job = dg.define_asset_job(
    "sfd_pipeline", selection=dg.AssetSelection.assets("fid_report").upstream(), tags=GPU_RUN_TAGS,
    description="Every stage up to the FID report of the final model (cached stages return at once).")

checkpoint_eval_job = dg.define_asset_job(
    "checkpoint_eval", selection=[CHECKPOINT_SAMPLES, CHECKPOINT_FID], partitions_def=checkpoint_partitions,
    tags=GPU_RUN_TAGS, description="Samples and FID of one sfd_model checkpoint (a 'sfd_checkpoints' partition).")


@dg.op(description="Load and validate the profile, the storage root and the pretrained weights.")
def check_setup(context: dg.OpExecutionContext, storage: StorageResource, profile: ProfileResource,
                compute: ComputeResource, pretrained: PretrainedResource) -> None:
    ctx = stage_context(storage, profile, compute, pretrained)
    context.log.info(f"profile {ctx.profile.name!r} ({ctx.profile.origin}) is valid; storage root {ctx.root}; "
                     f"compute {ctx.compute}; pretrained weights from {ctx.weights.source}")


@dg.job(description="Checks the setup without doing any work (fails with the field to fix).")
def preflight() -> None:
    check_setup()


jobs = [sfd_pipeline_job, checkpoint_eval_job, preflight]
