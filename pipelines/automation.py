"""Evaluate the newest sfd_model checkpoint: a sensor that reacts to new checkpoints and a nightly schedule.

Both launch ``checkpoint_eval`` for one ``sfd_checkpoints`` partition per checkpoint. A checkpoint is requested
once: the sensor remembers the last one in its cursor and dedupes by run key; both skip a checkpoint that already
has a queued, running or successful evaluation run (a failed one is retried by the next nightly tick).
"""

import dagster as dg

from pipelines.checkpoints import PARTITIONS_NAME, Checkpoint, checkpoint_partitions, newest_checkpoint
from pipelines.jobs import checkpoint_eval_job
from pipelines.resources import ComputeResource, PretrainedResource, ProfileResource, StorageResource
from pipelines.staging import stage_context

NIGHTLY_CRON = "0 2 * * *"
SENSOR_INTERVAL_S = 300
_SETTLED_FAILED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def evaluation_requested(instance: dg.DagsterInstance | None, key: str) -> bool:
    """True if an evaluation run for this checkpoint is queued, running or succeeded."""
    if instance is None:
        return False
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=checkpoint_eval_job.name,
                                                   tags={"dagster/partition": key}))
    return any(run.status not in _SETTLED_FAILED for run in runs)


def _newest(storage: StorageResource, profile: ProfileResource, compute: ComputeResource,
            pretrained: PretrainedResource) -> Checkpoint | None:
    return newest_checkpoint(stage_context(storage, profile, compute, pretrained))


def _request(checkpoint: Checkpoint, origin: str) -> dg.RunRequest:
    return dg.RunRequest(run_key=checkpoint.key, partition_key=checkpoint.key,
                         tags={"sfd/checkpoint_step": str(checkpoint.step), "sfd/trigger": origin})


@dg.sensor(job=checkpoint_eval_job, minimum_interval_seconds=SENSOR_INTERVAL_S,
           description="Evaluates each newly committed sfd_model checkpoint once (newest first).")
def new_checkpoint_sensor(context: dg.SensorEvaluationContext, storage: StorageResource, profile: ProfileResource,
                          compute: ComputeResource, pretrained: PretrainedResource) -> dg.SensorResult:
    checkpoint = _newest(storage, profile, compute, pretrained)
    if checkpoint is None:
        return dg.SensorResult(skip_reason="no committed sfd_model checkpoint for the current profile yet")
    if checkpoint.key == context.cursor or evaluation_requested(context.instance, checkpoint.key):
        return dg.SensorResult(skip_reason=f"{checkpoint.key} was already requested", cursor=checkpoint.key)
    return dg.SensorResult(run_requests=[_request(checkpoint, "sensor")], cursor=checkpoint.key,
                           dynamic_partitions_requests=[checkpoint_partitions.build_add_request([checkpoint.key])])


@dg.schedule(job=checkpoint_eval_job, cron_schedule=NIGHTLY_CRON, execution_timezone="UTC",
             description="Nightly: evaluates the newest sfd_model checkpoint unless it already was.")
def nightly_checkpoint_eval(context: dg.ScheduleEvaluationContext, storage: StorageResource,
                            profile: ProfileResource, compute: ComputeResource, pretrained: PretrainedResource):
    checkpoint = _newest(storage, profile, compute, pretrained)
    if checkpoint is None:
        return dg.SkipReason("no committed sfd_model checkpoint for the current profile yet")
    if evaluation_requested(context.instance, checkpoint.key):
        return dg.SkipReason(f"{checkpoint.key} was already evaluated")
    # A schedule cannot return partition requests (a sensor can): register the checkpoint directly.
    if not context.instance.has_dynamic_partition(PARTITIONS_NAME, checkpoint.key):
        context.instance.add_dynamic_partitions(PARTITIONS_NAME, [checkpoint.key])
    return _request(checkpoint, "nightly")


schedules = [nightly_checkpoint_eval]
sensors = [new_checkpoint_sensor]
