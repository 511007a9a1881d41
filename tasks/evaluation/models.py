"""What a model spec names, and what the model was trained on.

A spec is one of:

- `base` (or `embedded`): the evaluation engine as configured (its `model`; None is the packaged
  SmolLM2-135M-Instruct on the embedded engine);
- a local Hugging Face folder (`/models/my-7b`);
- a checkpoint in this data home's `models` view: `sft_model` (its newest version) or
  `sft_model@<version prefix>`;
- for the vLLM and OpenAI-compatible engines, a hub id or a served model name.

`label=spec` names the model in tables (`sft=sft_model@3f2a`). Each spec resolves to a
`ModelTarget`: the engine's `model` setting, an identity (for stage versions: a checkpoint's
version, a folder's checksum, the GGUF's checksum), the prompt format and the training sets.
Versions see the identity, never a path: a checkpoint is planned by its ref and found in the
home that runs the evaluation, so a copied or moved home plans and answers the same requests.

The training sets come from lineage, generically over manifests: from the checkpoint's manifest
follow `parents` (artifacts: checkpoints, reward models; datasets without text) until a dataset
that has a `prompt`, `question`, `instruction` or `text` column; those datasets are what the model
was trained on (`sft_set`, `rl_prompts`, ... whatever the training stages name them). A model
with no lineage (the base, a folder) has no known training sets: its contamination is unknown
(null), not zero.

The prompt format: `auto` (the default) is WizardMath's protocol, the Alpaca prompt sent raw for
every model: the base, the SFT and RL checkpoints (which learnt that prompt from `sft_set` and
`rl_prompts`) and any other, so a table compares models, not prompts, and a pretrained base
needs no chat template. `chat` sends each model the question through its own chat template (an
instruct model judged on its own terms); a model whose tokenizer is known to have no template
(a local folder or checkpoint without one) gets the Alpaca prompt instead, and its rows say
`alpaca`. Whether a hub model or a served one has a template is the engine's business.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from infra.engines import EngineConfig
from storage.datasets import DatasetError, DatasetStore
from storage.errors import UserError
from storage.settings import home

PromptFormat = Literal["alpaca", "chat"]
TRAINING_TEXT_COLUMNS = ("prompt", "question", "instruction", "text")
BASE_SPECS = ("base", "embedded")
# Where transformers keeps a tokenizer's chat template (5.x: its own file; 4.x: the config).
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# A checkpoint's identity: this prefix and its name@version in the store.
ARTIFACT_IDENTITY = "artifact:"
# A local folder's identity (`infra.models.local_identity` of a folder not converted from a GGUF).
FOLDER_IDENTITY = "folder-sha256:"

log = logging.getLogger(__name__)


class ModelSpecError(UserError):
    """A model spec that names nothing evaluable."""


class ModelTarget(BaseModel):
    """One model to evaluate, resolved from its spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(description="name in tables and results")
    spec: str = Field(description="the spec as given")
    model: str | None = Field(description="the engine's `model` setting for this model")
    artifact: str | None = Field(None, description="name@version of a checkpoint in the store")
    identity: str = Field(description="what identifies the weights (stage versions)")
    prompt_format: PromptFormat
    training_sets: list[str] = Field(
        default_factory=list, description="dataset versions the model was trained on (lineage)"
    )

    @property
    def is_folder(self) -> bool:
        """A local folder named by the spec (not a checkpoint in the store, not the base)."""
        return self.artifact is None and self.identity.startswith(FOLDER_IDENTITY)

    @property
    def planned_model(self) -> str | None:
        """The engine's `model` as a plan row holds it: a hub id or a served name; None for the
        engine's own setting, a checkpoint (found by its ref) or a folder (by its identity)."""
        return None if self.artifact or self.is_folder else self.model

    def fingerprint(self) -> dict[str, object]:
        """What the model is, not where it lives: the identity, the checkpoint's ref, the
        prompt format and the lineage; not the engine's `model` setting (a checkpoint's folder
        under this home) or the spec as typed (which may be a folder path)."""
        return self.model_dump(mode="json", exclude={"model", "spec"})


class ModelFolders(BaseModel):
    """Where this run finds the local folders of a plan's models, by identity. A plan row names
    a folder model by its identity only, so a folder copied or moved plans the same requests;
    these paths are what the engines load here, and no part of any version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folders: dict[str, str] = Field(default_factory=dict, description="identity → local folder")

    @classmethod
    def of(cls, targets: list[ModelTarget], engine: EngineConfig | None = None) -> ModelFolders:
        """The folders of the folder models among `targets`; the base (`model` None) is the
        engine's own folder, when the engine loads one."""
        folders: dict[str, str] = {}
        for t in targets:
            if t.is_folder and t.model:
                folders[t.identity] = t.model
            elif t.is_folder and engine is not None and engine.model:
                folders[t.identity] = str(Path(engine.model).expanduser().resolve())
        return cls(folders=folders)

    def fingerprint(self) -> None:
        """Where a model lives is not what it is (its identity, in every row)."""
        return None


def training_sets(store: DatasetStore, start: str) -> tuple[list[str], list[str]]:
    """(training sets, everything visited) from `start` up its lineage (see module docstring).

    A parent whose manifest is missing (deleted, another home) is skipped: lineage is evidence,
    not a requirement."""
    found: list[str] = []
    visited: list[str] = []
    queue = deque([start])
    seen = {start}
    while queue:
        ref = queue.popleft()
        try:
            manifest = store.manifest(ref)
        except DatasetError:
            continue
        visited.append(ref)
        if manifest.is_dataset and ref != start:
            columns = {c["name"] for c in manifest.schema}
            if columns & set(TRAINING_TEXT_COLUMNS):
                found.append(ref)
                continue
        for parent in manifest.parents:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return found, visited


def has_chat_template(folder: Path) -> bool | None:
    """Whether the tokenizer saved in `folder` has a chat template; None without a tokenizer."""
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    if (folder / "additional_chat_templates").is_dir():
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (json.JSONDecodeError, OSError):
        return None


def _engine_folder(engine: EngineConfig) -> Path | None:
    """The local folder the engine's own model (the base) is, when it is one."""
    if engine.model and Path(engine.model).expanduser().is_dir():
        return Path(engine.model).expanduser()
    return None


def _checkpoint_problem(folder: Path) -> str | None:
    """Why a folder cannot be loaded as a causal LM by the engines, or None."""
    config = folder / "config.json"
    if not config.is_file():
        if (folder / "adapter_config.json").is_file():
            return "is a LoRA adapter without a config.json (merge it into its base first)"
        return "has no config.json"
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (json.JSONDecodeError, OSError) as exc:
        return f"has an unreadable config.json ({exc})"
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        return f"is not a causal language model (architectures: {', '.join(architectures)})"
    return None


def _base_identity(engine: EngineConfig) -> str:
    if engine.model is None and engine.kind != "openai":  # the packaged model, on any engine
        from infra.models import PACKAGED_NAME, file_checksum, packaged_gguf

        return f"{PACKAGED_NAME}@gguf-sha256:{file_checksum(packaged_gguf())}"
    if engine.kind != "openai":
        from infra.models import is_local_model, local_identity

        if is_local_model(engine.model):
            assert engine.model is not None
            return local_identity(Path(engine.model).expanduser().resolve())
    return f"{engine.kind}:{engine.model}@{engine.revision or 'unpinned'}"


def _model_names(store: DatasetStore) -> list[str]:
    names = []
    for name in store.names():
        versions = store.versions(name)
        if versions and versions[-1].kind == "model":
            names.append(name)
    return names


def resolve_spec(
    spec: str,
    engine: EngineConfig,
    prompt_format: Literal["auto", "alpaca", "chat"] = "auto",
    store: DatasetStore | None = None,
) -> ModelTarget:
    """The `ModelTarget` a spec names (see the module docstring); a one-line error otherwise."""
    store = store or DatasetStore(home())
    label, sep, body = spec.partition("=")
    if not sep:
        label, body = "", spec
    body = body.strip()
    if not body:
        raise ModelSpecError(f"model spec {spec!r} is empty")

    def target(
        label: str,
        model: str | None,
        identity: str,
        artifact: str | None = None,
        trained: list[str] | None = None,
        folder: Path | None = None,
    ) -> ModelTarget:
        fmt: PromptFormat = "chat" if prompt_format == "chat" else "alpaca"
        if fmt == "chat" and folder is not None and has_chat_template(folder) is False:
            log.warning(
                "model %s has no chat template: it is evaluated with the Alpaca prompt", spec
            )
            fmt = "alpaca"
        return ModelTarget(
            label=label,
            spec=spec,
            model=model,
            artifact=artifact,
            identity=identity,
            prompt_format=fmt,
            training_sets=trained or [],
        )

    if body in BASE_SPECS:
        # `model` None: the engine's own setting, whatever folder it names on this machine.
        return target(label or "base", None, _base_identity(engine), folder=_engine_folder(engine))
    folder = Path(body).expanduser()
    if folder.is_dir():
        folder = folder.resolve()
        problem = _checkpoint_problem(folder) if engine.kind != "openai" else None
        if problem:
            raise ModelSpecError(f"model {spec!r}: folder {folder} {problem}")
        from infra.models import folder_checksum

        return target(
            label or folder.name,
            str(folder),
            f"{FOLDER_IDENTITY}{folder_checksum(folder)}",
            folder=folder,
        )
    name = body.partition("@")[0]
    if name in store.names():
        try:
            manifest = store.resolve(body)
        except DatasetError as exc:
            raise ModelSpecError(f"model {spec!r}: {exc}") from exc
        if manifest.kind != "model":
            raise ModelSpecError(
                f"model {spec!r}: {manifest.name}@{manifest.version} is a {manifest.kind}, "
                f"not a model checkpoint"
            )
        path = store.version_dir(manifest.name, manifest.version)
        problem = _checkpoint_problem(path)
        if problem:
            raise ModelSpecError(f"model {spec!r}: {manifest.name}@{manifest.version} {problem}")
        ref = f"{manifest.name}@{manifest.version}"
        found, _ = training_sets(store, ref)
        return target(
            label or f"{manifest.name}@{manifest.version[:8]}",
            str(path),
            f"{ARTIFACT_IDENTITY}{ref}",
            artifact=ref,
            trained=found,
            folder=path,
        )
    if engine.kind != "embedded" or (body.count("/") == 1 and not body.startswith((".", "/"))):
        # A hub id or a served model name: the engine resolves it (and fails clearly if it can't).
        return target(label or body, body, f"{engine.kind}:{body}@{engine.revision or 'unpinned'}")
    known = ", ".join(_model_names(store)) or "none"
    raise ModelSpecError(
        f"model {spec!r} is not 'base', a local folder, or a model checkpoint in this data home "
        f"(models: {known})"
    )


def resolve_specs(
    specs: list[str],
    engine: EngineConfig,
    prompt_format: Literal["auto", "alpaca", "chat"] = "auto",
    skip_missing: bool = False,
) -> list[ModelTarget]:
    """Every spec's target, in order; with `skip_missing`, specs naming nothing are left out
    (a demo whose training was switched off still evaluates the base)."""
    targets: list[ModelTarget] = []
    for spec in specs:
        try:
            found = resolve_spec(spec, engine, prompt_format)
        except ModelSpecError:
            if not skip_missing:
                raise
            continue
        if any(t.label == found.label for t in targets):
            raise ModelSpecError(f"two models are labelled {found.label!r}: use label=spec")
        targets.append(found)
    if not targets:
        raise ModelSpecError(f"none of the models {specs} could be found")
    return targets


@task(name="resolve_models")
def resolve_models(
    specs: list[str],
    engine: EngineConfig,
    prompt_format: Literal["auto", "alpaca", "chat"] = "auto",
    skip_missing: bool = False,
) -> list[ModelTarget]:
    """Resolve model specs to targets: checkpoint folders, identities, training-set lineage."""
    return resolve_specs(specs, engine, prompt_format, skip_missing)
