"""Group "semantic": the Semantic VAE and the semantic latents it encodes."""
from pipelines.assets.factory import stage_asset
from pipelines.stages import STAGES

semvae = stage_asset(STAGES["semvae"])
semantic_latents = stage_asset(STAGES["semantic_latents"])

assets = [semvae, semantic_latents]
