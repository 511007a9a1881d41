"""Run profiles and their overrides, for `evolforge run` and `evolforge eval` alike: a profile
(`configs/*.yaml`, which may `extends:` another), dotted `--set` keys, and one-line validation
errors that name the key and, for an unknown key, the nearest valid one."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from storage.errors import UserError

M = TypeVar("M", bound=BaseModel)


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


def _defaults_for(data: dict[str, Any], model: type[BaseModel]) -> None:
    """Fill list fields that an override indexes into with their defaults, so that
    `seeds.sources.0.limit=6` edits the default source instead of replacing the list."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            data.setdefault(name, {})
            if isinstance(data[name], dict):
                _defaults_for(data[name], annotation)
        elif name not in data and info.default_factory is not None:
            default = info.default_factory()
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                data[name] = [item.model_dump(exclude_unset=True) for item in default]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, groups merged key by key (lists and values replaced)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_profile(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A run profile as a dict. `extends: other.yaml` (relative to the profile) starts from
    another profile and changes only what this one sets."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: profiles extend each other in a circle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a profile file name")
    return _merge(read_profile(path.parent / parent, (*seen, path.resolve())), data)


def load_profile(
    config: str | Path | None,
    overrides: Sequence[str],
    model: type[M],
    section: str | None = None,
    given: dict[str, Any] | None = None,
) -> M:
    """`model` from a run profile (or its defaults when there is none) and overrides.

    `section` takes one section of the profile (`evaluation`) for a model of that section;
    `given` (a command's own options) replaces fields of it; then each `--set KEY=VALUE` sets
    a field by its dotted path, relative to the section (which a key may name:
    `evaluation.k=4` and `k=4` are the same).
    """
    data = read_profile(Path(config)) if config else {}
    where = str(config or "parameters")
    if section is not None:
        part = data.get(section) or {}
        if not isinstance(part, dict):
            raise ConfigError(f"{config}: expected a mapping under {section!r}")
        data, where = dict(part), section
    data.update(given or {})
    if overrides:
        _defaults_for(data, model)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key = key.strip()
        if section is not None:
            key = key.removeprefix(f"{section}.")
        set_dotted(data, key, yaml.safe_load(raw) if raw else "")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, model, where)) from exc
