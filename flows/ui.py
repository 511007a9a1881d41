"""Parameter forms the Prefect UI can render well.

Pydantic writes an optional field (`limit: int | None = None`) as `anyOf: [{integer}, {null}]`,
which the UI's form shows as a type switch reading "Property is type None". Here such a field
becomes its plain type with a null default, so the form shows one input (left empty, the field
keeps its default). The flows' own pydantic models still validate every run: deployments are
registered with `enforce_parameter_schema=False`, so the server does not reject the null
defaults the simplified schema no longer lists.
"""

from __future__ import annotations

import copy
from typing import Any

NULL = {"type": "null"}


def _collapse(node: Any) -> Any:
    if isinstance(node, dict):
        node = {key: _collapse(value) for key, value in node.items()}
        options = node.get("anyOf")
        if isinstance(options, list) and NULL in options and len(options) == 2:
            (kept,) = [option for option in options if option != NULL]
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**kept, **rest}
        return node
    if isinstance(node, list):
        return [_collapse(item) for item in node]
    return node


def form_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a flow's parameter schema with nullable fields shown as their plain type."""
    return _collapse(copy.deepcopy(schema))


def for_the_ui(deployment: Any) -> Any:
    """A `RunnerDeployment` whose parameter form renders without null-type switches."""
    from prefect.utilities.callables import ParameterSchema

    schema = deployment._parameter_openapi_schema.model_dump()
    deployment._parameter_openapi_schema = ParameterSchema(**form_schema(schema))
    deployment.enforce_parameter_schema = False
    return deployment
