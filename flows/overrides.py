"""Overrides of parameter models: dotted `--set` keys, and one-line validation errors that
name the key and, for an unknown key, the nearest valid one."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from storage.errors import UserError


class ConfigError(UserError):
    """A run profile or override that does not fit the parameter model."""


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for position, key in enumerate(keys):
        last = position == len(keys) - 1
        where = ".".join(keys[: position + 1])
        if isinstance(node, list):
            if not key.isdigit():
                raise ConfigError(f"--set {dotted}: {where!r} is a list: use an index (0, 1, ...)")
            index = int(key)
            if index > len(node):
                raise ConfigError(
                    f"--set {dotted}: {where!r}: index {index} past the end (list has {len(node)})"
                )
            if index == len(node):
                node.append({})
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {keys[position - 1]!r} is not a group of settings")
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def _nearest(model: type[BaseModel], loc: tuple[Any, ...], key: str) -> str | None:
    """The nearest field name to `key` in the model found at `loc`."""
    node: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            break
        annotation = fields[part].annotation
        args = getattr(annotation, "__args__", None)
        if args:  # list[Model] or Model | None
            annotation = next((a for a in args if isinstance(a, type)), annotation)
        node = annotation
    fields = getattr(node, "model_fields", None) or {}
    match = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    if match:
        return match[0]
    # A key that moved into a group of settings (`temperature` → `sampling.temperature`).
    for name, info in fields.items():
        inner = getattr(info.annotation, "model_fields", None) or {}
        if key in inner:
            return f"{name}.{key}"
    return None


def validation_message(exc: ValidationError, model: type[BaseModel], where: str) -> str:
    """One line for the first error: the dotted key, what is wrong, the nearest valid key."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        nearest = _nearest(model, loc[:-1], str(loc[-1]))
        parent = ".".join(str(p) for p in loc[:-1])
        hint = f"; did you mean {'.'.join(filter(None, [parent, nearest]))!r}?" if nearest else ""
        return f"{where}: unknown key {key!r}{hint}"
    return f"{where}: {key}: {err['msg']}"
