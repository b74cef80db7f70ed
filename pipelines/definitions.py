"""The one ``defs`` of the SFD pipeline (``dagster ... -m pipelines.definitions``).

Loads fast and never imports torch: stage programs run as subprocesses; everything heavy is imported there.
"""
from __future__ import annotations

import dagster as dg

from pipelines import automation, jobs
from pipelines.assets import checkpoint_eval, data, eval as eval_assets, features, semantic, train
from pipelines.assets.factory import GPU_TAG
from pipelines.io_manager import ManifestIOManagerFactory
from pipelines.resources import ComputeResource, PretrainedResource, ProfileResource, StorageResource

# Steps run in their own processes; the GPU tag keeps GPU stages one at a time inside a run as well.
executor = dg.multiprocess_executor.configured({
    "max_concurrent": 2,
    "tag_concurrency_limits": [{"key": key, "value": value, "limit": 1} for key, value in GPU_TAG.items()],
})


def make_resources(storage_root: str | None = None, profile: str | None = None) -> dict:
    """The resources of ``defs``; tests and the CLI pass a root/profile, ``None`` means env/defaults."""
    storage = StorageResource(root=storage_root)
    return {
        "storage": storage,
        "profile": ProfileResource(name=profile),
        "compute": ComputeResource(),
        "pretrained": PretrainedResource(),
        "io_manager": ManifestIOManagerFactory(storage=storage),
    }


all_assets = [*data.assets, *features.assets, *semantic.assets, *train.assets, *eval_assets.assets,
              *checkpoint_eval.assets]

defs = dg.Definitions(
    assets=all_assets,
    jobs=jobs.jobs,
    schedules=automation.schedules,
    sensors=automation.sensors,
    resources=make_resources(),
    executor=executor,
)
