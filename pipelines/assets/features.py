"""Group "features": texture latents (SD-VAE f16d32) and DINOv2 features of every image and its flip."""
from pipelines.assets.factory import stage_asset
from pipelines.stages import STAGES

texture_latents = stage_asset(STAGES["texture_latents"])
dinov2_features = stage_asset(STAGES["dinov2_features"])

assets = [texture_latents, dinov2_features]
