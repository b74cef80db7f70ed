"""Group "data": the external image source and its WebDataset shards."""
from pipelines.assets.factory import imagenet_source, stage_asset
from pipelines.stages import STAGES

imagenet_shards = stage_asset(STAGES["imagenet_shards"])

assets = [imagenet_source, imagenet_shards]
