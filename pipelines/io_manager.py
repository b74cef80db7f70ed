"""The JSON IO manager: assets pass only their small stage manifests, stored at ``<root>/_manifests/<asset>.json``
(``<asset>/<partition>.json`` for partitioned assets), local or on S3. Tensors never travel through Dagster."""
from __future__ import annotations

from typing import Any

import dagster as dg
from upath import UPath

from pipelines.resources import StorageResource
from storage import fs

MANIFESTS_DIR = "_manifests"


class MissingUpstreamError(dg.Failure):
    """A selected asset's upstream was never materialized under this storage root."""


def manifest_store_url(root: str, asset: str, partition: str | None = None) -> str:
    """Where the IO manager keeps ``asset``'s manifest (what a downstream asset will load)."""
    name = f"{partition}.json" if partition else f"{asset}.json"
    return fs.join(root, MANIFESTS_DIR, asset, name) if partition else fs.join(root, MANIFESTS_DIR, name)


class ManifestIOManager(dg.UPathIOManager):
    extension = ".json"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        fs.write_json(str(path), obj)  # atomic on local disks, a single PUT on S3

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        try:
            return fs.read_json(str(path))
        except FileNotFoundError:
            upstream = context.asset_key.to_user_string() if context.has_asset_key else context.name
            downstream = context.op_def.name if context.op_def is not None else "this asset"
            raise MissingUpstreamError(
                description=(f"upstream asset '{upstream}' of '{downstream}' has no stored manifest at {path}: it "
                             f"was never materialized under this storage root. Build it first, e.g. "
                             f"dagster asset materialize -m pipelines.definitions --select '+key:\"{downstream}\"'"),
                metadata={"missing_upstream": upstream, "manifest_path": str(path)},
            ) from None


class ManifestIOManagerFactory(dg.ConfigurableIOManagerFactory):
    """Stores manifests under the same root as the artifacts (``SFD_STORAGE_ROOT`` or ``artifacts/``)."""

    storage: StorageResource

    def create_io_manager(self, context: dg.InitResourceContext) -> ManifestIOManager:
        base = fs.join(self.storage.url, MANIFESTS_DIR)
        return ManifestIOManager(base_path=UPath(base, **fs.storage_options(base)))
