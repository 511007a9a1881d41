"""The flows by name, for the CLI (`evolforge run --flow NAME`) and the deployments."""

from __future__ import annotations

from flows.data import data
from flows.factory import factory

FLOWS = {"factory": factory, "data": data}
