"""Group "train": the SFD model and the small AutoGuidance model."""
from pipelines.assets.factory import stage_asset
from pipelines.stages import STAGES

sfd_model = stage_asset(STAGES["sfd_model"])
autoguidance_model = stage_asset(STAGES["autoguidance_model"])

assets = [sfd_model, autoguidance_model]
