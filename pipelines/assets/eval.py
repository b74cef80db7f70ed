"""Group "eval": reference statistics, samples of the final model and the FID report."""
from pipelines.assets.factory import stage_asset
from pipelines.stages import STAGES

fid_reference = stage_asset(STAGES["fid_reference"])
sfd_samples = stage_asset(STAGES["sfd_samples"])
fid_report = stage_asset(STAGES["fid_report"])

assets = [fid_reference, sfd_samples, fid_report]
