"""Per-checkpoint evaluation (group "eval"): samples and FID of one sfd_model checkpoint per partition of the
dynamic partitions "sfd_checkpoints". The sensor and the nightly schedule add partitions and launch runs, so
each checkpoint is evaluated once and its result stays recorded under its own partition.

Training may still be running, so there is no sfd_model manifest yet: the sampler gets the checkpoint's EMA
weights explicitly, with the model spec that training recorded in the checkpoint's ``_COMPLETE.json``.
"""
import dataclasses
from typing import Any, Iterator

import dagster as dg

from pipelines import checks
from pipelines.assets.factory import gpu_options
from pipelines.checkpoints import MODEL_STAGE, checkpoint_partitions, checkpoint_source, parse_key
from pipelines.resources import ComputeResource, PretrainedResource, ProfileResource, StorageResource
from pipelines.staging import materialize_stage, stage_context
from pipelines.stages import CHECKPOINT_FIELD, STAGES, StageSpec

SAMPLES_STAGE, REPORT_STAGE = "sfd_samples", "fid_report"
CHECKPOINT_SAMPLES, CHECKPOINT_FID = "checkpoint_samples", "checkpoint_fid"
MODEL_URL_FIELD = "model_url"


def checkpoint_eval_assets(samples: StageSpec, report: StageSpec) -> list[dg.AssetsDefinition]:
    """The two partitioned assets, running ``samples`` (sfd_core.generate) and ``report`` (sfd_core.fid)."""
    # generate with the model given as a checkpoint file instead of a finished sfd_model stage dir
    samples_spec = dataclasses.replace(samples, asset=CHECKPOINT_SAMPLES,
                                       inputs={k: v for k, v in samples.inputs.items() if k != MODEL_URL_FIELD})

    @dg.asset(name=CHECKPOINT_SAMPLES, group_name="eval", partitions_def=checkpoint_partitions,
              code_version=samples_spec.code_version, deps=[MODEL_STAGE],
              ins={name: dg.AssetIn(key=name) for name in dict.fromkeys(samples_spec.inputs.values())},
              check_specs=checks.check_specs(CHECKPOINT_SAMPLES), kinds={"pytorch"}, **gpu_options(True),
              description="sfd_samples of one sfd_model checkpoint (partition '<model fingerprint>-step_NNNNNNN').")
    def checkpoint_samples(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
                           compute: ComputeResource, pretrained: PretrainedResource,
                           **upstream: dict) -> Iterator[Any]:
        model_fingerprint, step_dir = parse_key(context.partition_key)
        ctx = stage_context(storage, profile, compute, pretrained)
        source = checkpoint_source(ctx.root, model_fingerprint, step_dir)
        yield from materialize_stage(
            context, samples_spec, ctx, upstream, compute, profile_stage=SAMPLES_STAGE,
            overrides={MODEL_URL_FIELD: "", **source.spec}, locations={CHECKPOINT_FIELD: source.weights_url},
            extra_upstream={MODEL_STAGE: context.partition_key})

    @dg.asset(name=CHECKPOINT_FID, group_name="eval", partitions_def=checkpoint_partitions,
              code_version=report.code_version,
              ins={SAMPLES_STAGE: dg.AssetIn(key=CHECKPOINT_SAMPLES), "fid_reference": dg.AssetIn(key="fid_reference")},
              check_specs=checks.check_specs(CHECKPOINT_FID), kinds={"pytorch"}, **gpu_options(True),
              description="FID report of one sfd_model checkpoint's samples.")
    def checkpoint_fid(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
                       compute: ComputeResource, pretrained: PretrainedResource, **upstream: dict) -> Iterator[Any]:
        ctx = stage_context(storage, profile, compute, pretrained)
        yield from materialize_stage(context, report, ctx, upstream, compute)

    return [checkpoint_samples, checkpoint_fid]


assets = checkpoint_eval_assets(STAGES[SAMPLES_STAGE], STAGES[REPORT_STAGE])
