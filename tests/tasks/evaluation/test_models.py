"""Model specs and lineage, on synthetic checkpoints and training sets written to the store the way
the training stages write them (datasets with a prompt column, model artifacts with parents)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from infra.engines import EngineConfig
from storage.datasets import DatasetStore, Manifest
from storage.settings import home
from tasks.evaluation.models import (
    CHAT_TEMPLATE_FILES,
    ModelSpecError,
    has_chat_template,
    resolve_spec,
    resolve_specs,
    training_sets,
)


def write_dataset(store: DatasetStore, name: str, frame: pl.DataFrame, parents=()) -> str:
    manifest = store.write(
        name, frame, stage=name, code_version="test", params={"n": frame.height}, parents=parents
    )
    return str(manifest.ref)


def write_model(
    store: DatasetStore,
    tmp: Path,
    name: str,
    parents=(),
    architectures=("LlamaForCausalLM",),
    tag: str = "",
) -> Manifest:
    folder = tmp / f"src-{name}-{tag}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": list(architectures)}))
    (folder / "model.safetensors").write_bytes(b"weights" + tag.encode())
    return store.write_folder(
        name,
        folder,
        kind="model",
        stage=f"train_{name}",
        code_version="test",
        params={"tag": tag},
        parents=parents,
    )


@pytest.fixture
def lineage(tmp_path):
    """instructions → sft_set → sft_model → rl_model ← rl_prompts; irm_model (a classifier)."""
    store = DatasetStore(home())
    instructions = write_dataset(
        store, "instructions", pl.DataFrame({"id": ["i1"], "text": ["What is 2 + 3?"]})
    )
    answers = write_dataset(
        store,
        "answers",
        pl.DataFrame({"instruction_id": ["i1"], "answer": ["5"]}),
        parents=[instructions],
    )
    sft_set = write_dataset(
        store,
        "sft_set",
        pl.DataFrame({"prompt": ["What is 2 + 3?"], "completion": ["The answer is: 5"]}),
        parents=[instructions, answers],
    )
    rl_prompts = write_dataset(
        store, "rl_prompts", pl.DataFrame({"prompt": ["What is 4 + 4?"]}), parents=[answers]
    )
    sft = write_model(store, tmp_path, "sft_model", parents=[sft_set])
    rl = write_model(store, tmp_path, "rl_model", parents=[str(sft.ref), rl_prompts])
    irm = write_model(
        store,
        tmp_path,
        "irm_model",
        parents=[instructions],
        architectures=("LlamaForSequenceClassification",),
    )
    return {
        "store": store,
        "instructions": instructions,
        "answers": answers,
        "sft_set": sft_set,
        "rl_prompts": rl_prompts,
        "sft": sft,
        "rl": rl,
        "irm": irm,
    }


def test_lineage_walk_stops_at_datasets_with_text(lineage):
    store = lineage["store"]
    found, visited = training_sets(store, str(lineage["rl"].ref))
    assert found == [lineage["rl_prompts"], lineage["sft_set"]]
    assert str(lineage["sft"].ref) in visited
    assert lineage["instructions"] not in visited  # stops at the training set
    # A dataset without a text column is walked through to its parents.
    found, _ = training_sets(store, lineage["answers"])
    assert found == [lineage["instructions"]]


def test_checkpoints_resolve_by_name_and_version_prefix(lineage, tmp_path):
    store, engine = lineage["store"], EngineConfig()
    sft = resolve_spec("sft_model", engine, store=store)
    version = lineage["sft"].version
    assert sft.label == f"sft_model@{version[:8]}"
    assert sft.artifact == f"sft_model@{version}"
    assert sft.model == str(store.version_dir("sft_model", version))
    assert sft.identity == f"artifact:sft_model@{version}"
    assert sft.training_sets == [lineage["sft_set"]]
    assert sft.prompt_format == "alpaca"  # trained on sft_set
    newer = write_model(store, tmp_path, "sft_model", parents=[lineage["sft_set"]], tag="2")
    assert resolve_spec("sft_model", engine, store=store).artifact == str(newer.ref)
    assert resolve_spec(f"sft_model@{version[:6]}", engine, store=store).artifact == str(
        lineage["sft"].ref
    )
    rl = resolve_spec("rl=rl_model", engine, store=store)
    assert rl.label == "rl" and rl.prompt_format == "alpaca"
    assert rl.training_sets == [lineage["rl_prompts"], lineage["sft_set"]]
    assert resolve_spec("rl_model", engine, "chat", store=store).prompt_format == "chat"


def test_specs_that_name_nothing_evaluable_are_one_line_errors(lineage, tmp_path):
    store, engine = lineage["store"], EngineConfig()
    with pytest.raises(ModelSpecError, match=r"irm_model@\w+ is not a causal language model"):
        resolve_spec("irm_model", engine, store=store)
    with pytest.raises(ModelSpecError, match=r"is a dataset, not a model checkpoint"):
        resolve_spec("sft_set", engine, store=store)
    with pytest.raises(ModelSpecError, match=r"no version of 'sft_model' matches 'zzz'"):
        resolve_spec("sft_model@zzz", engine, store=store)
    with pytest.raises(ModelSpecError, match=r"\(models: irm_model, rl_model, sft_model\)"):
        resolve_spec("dpo_model", engine, store=store)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelSpecError, match="LoRA adapter"):
        resolve_spec(str(adapter), engine, store=store)


def test_base_folders_and_served_models(lineage, tmp_path):
    store = lineage["store"]
    base = resolve_spec("base", EngineConfig(), store=store)
    assert (base.label, base.model, base.prompt_format) == ("base", None, "alpaca")
    assert base.identity.startswith("SmolLM2-135M-Instruct@gguf-sha256:")
    assert base.training_sets == []  # unknown lineage: contamination unknown, not zero
    # The packaged model is named by its file on vLLM too (what `kind: auto` may pick), not as
    # an unpinned "vllm:None".
    on_vllm = resolve_spec("base", EngineConfig(kind="vllm"), store=store)
    assert on_vllm.identity == base.identity
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    local = resolve_spec(str(folder), EngineConfig(), store=store)
    assert (local.label, local.model) == ("my-model", str(folder))
    assert local.identity.startswith("folder-sha256:")
    vllm = EngineConfig(kind="vllm")
    hub = resolve_spec("Qwen/Qwen2.5-0.5B-Instruct", vllm, store=store)
    assert (hub.label, hub.model) == ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")
    served = resolve_spec("base", EngineConfig(kind="openai", model="served-7b"), store=store)
    # The base leaves the engine's own setting in place (None), named by its identity.
    assert served.model is None and served.identity == "openai:served-7b@unpinned"


def test_resolving_several_specs(lineage):
    engine = EngineConfig()
    targets = resolve_specs(["base", "sft=sft_model", "nothing_here"], engine, skip_missing=True)
    assert [t.label for t in targets] == ["base", "sft"]
    with pytest.raises(ModelSpecError, match="nothing_here"):
        resolve_specs(["base", "nothing_here"], engine)
    with pytest.raises(ModelSpecError, match="two models are labelled 'base'"):
        resolve_specs(["base", "embedded"], engine)
    with pytest.raises(ModelSpecError, match="none of the models"):
        resolve_specs(["nothing_here"], engine, skip_missing=True)


@pytest.fixture
def packaged_and_bare(tmp_path):
    """The packaged SmolLM2 folder, and the same model whose tokenizer has no chat template
    (a pretrained base), its weights linked."""
    from infra.models import resolve_model

    packaged = Path(resolve_model(None).path)
    bare = tmp_path / "bare-base"
    bare.mkdir()
    for item in packaged.iterdir():
        if item.name == "model.safetensors":
            (bare / item.name).symlink_to(item)
        elif item.name not in CHAT_TEMPLATE_FILES:
            (bare / item.name).write_bytes(item.read_bytes())
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    return packaged, bare


def test_auto_is_the_alpaca_prompt_for_every_model_and_chat_needs_a_template(
    lineage, packaged_and_bare
):
    store, packaged, bare = lineage["store"], *packaged_and_bare
    assert has_chat_template(packaged) is True and has_chat_template(bare) is False
    on_bare = EngineConfig(model=str(bare))
    specs = ["base", "sft_model", str(packaged), str(bare)]
    # auto: WizardMath's protocol, one prompt for all (an instruct model with a template too).
    for spec in specs:
        assert resolve_spec(spec, EngineConfig(), store=store).prompt_format == "alpaca"
    assert resolve_spec("base", on_bare, store=store).prompt_format == "alpaca"
    # chat: a model's own template where it has one, the Alpaca prompt where it has none.
    assert resolve_spec("base", EngineConfig(), "chat", store=store).prompt_format == "chat"
    assert resolve_spec(str(packaged), EngineConfig(), "chat", store=store).prompt_format == "chat"
    assert resolve_spec(str(bare), EngineConfig(), "chat", store=store).prompt_format == "alpaca"
    assert resolve_spec("base", on_bare, "chat", store=store).prompt_format == "alpaca"


def test_a_base_without_a_chat_template_is_evaluated_without_a_crash(packaged_and_bare):
    from transformers import AutoTokenizer

    from infra.engines import build_engine
    from infra.engines.base import SamplingParams
    from tasks.evaluation.evaluate import _request, prompt_templates

    _, bare = packaged_and_bare
    with pytest.raises(ValueError, match="chat template"):
        AutoTokenizer.from_pretrained(bare).apply_chat_template([{"role": "user", "content": "hi"}])
    target = resolve_spec("base", EngineConfig(model=str(bare)))
    template = prompt_templates(target.prompt_format)["cot"]
    sampling = SamplingParams(temperature=0.0, max_tokens=4)
    engine = build_engine(EngineConfig(model=str(bare), dtype="float32"))
    (response,) = engine.generate([_request(template, "What is 2 + 3?", sampling, raw=True)])
    assert response.error is None and response.completions[0].completion_tokens > 0


def test_a_target_is_identified_by_what_it_is_not_where_it_lives(tmp_path):
    """A checkpoint resolved in two homes: the engine's `model` (its folder) differs, the
    fingerprint that enters eval_requests and eval_contamination does not."""
    from tasks.evaluation.models import ModelTarget

    def target(model: str, identity: str = "artifact:sft_model@abc") -> ModelTarget:
        return ModelTarget(
            label="sft",
            spec=model,
            model=model,
            artifact="sft_model@abc",
            identity=identity,
            prompt_format="alpaca",
            training_sets=["sft_set@def"],
        )

    here, there = target("/home/a/datasets/sft_model/abc"), target("/srv/b/datasets/sft_model/abc")
    assert here.fingerprint() == there.fingerprint()
    assert "/home/a" not in json.dumps(here.fingerprint())
    assert target("/x", "artifact:sft_model@other").fingerprint() != here.fingerprint()


def test_the_base_on_a_local_folder_is_found_by_its_identity(tmp_path):
    """A base model the engine loads from a local folder is planned by identity (no path), and
    the run finds its folder through the engine's own setting."""
    from tasks.evaluation.models import ModelFolders

    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    engine = EngineConfig(kind="vllm", model=str(folder))
    base = resolve_spec("base", engine)
    assert base.model is None and base.is_folder
    assert ModelFolders.of([base]).folders == {}
    assert ModelFolders.of([base], engine).folders == {base.identity: str(folder.resolve())}
