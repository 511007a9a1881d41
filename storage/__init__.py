"""Versioned parquet datasets with manifests and lineage, the DuckDB catalog, the request cache."""

from storage.catalog import Catalog
from storage.datasets import DatasetRef, DatasetStore, Manifest, version_id

__all__ = ["Catalog", "DatasetRef", "DatasetStore", "Manifest", "version_id"]
