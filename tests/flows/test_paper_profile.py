"""`configs/paper.yaml` says what WizardMath does, through the loader `evolforge run` uses: eight
rounds on vLLM, Active Evol-Instruct on, two evolvers that the factory itself runs, the RL reward
rI * rA alone; and the data flow pins the IRM that Active Evol-Instruct names by its name."""

from __future__ import annotations

from pathlib import Path

from flows.data import pin_irm
from flows.params import DataParams, FactoryParams
from flows.registry import load_params
from storage.datasets import DatasetStore
from storage.settings import PROJECT_ROOT

PAPER = PROJECT_ROOT / "configs" / "paper.yaml"


def test_the_paper_profile_runs_what_the_paper_does():
    paper = load_params(PAPER, [])
    assert isinstance(paper, FactoryParams)
    assert {s.kind for s in paper.seeds.sources} == {"gsm8k", "math"}
    assert paper.evolution.rounds == 8
    assert paper.engine.kind == "vllm"
    # Active Evol-Instruct: the trained IRM filters evolutions from round 2 on.
    assert paper.elimination.irm_model == "irm_model"
    assert paper.elimination.irm_from_round == 2
    # Two evolvers (WizardMath's IRM data), two models, both run by the factory: no server that
    # nothing starts.
    evolvers = paper.rewards.evolvers
    assert len(evolvers) == 2 and len({e.model for e in evolvers}) == 2
    assert {e.kind for e in evolvers} == {"vllm"}
    assert all(e.base_url is None for e in evolvers)
    # r = rI * rA from the reward models, as the paper; mixed precision on the GPU.
    assert paper.training.rl.correctness_gate is False
    assert {paper.training.sft.precision, paper.training.rl.precision} == {"bf16"}
    assert paper.evaluation.engine.kind == "vllm"
    header = PAPER.read_text().split("\nseeds:", 1)[0]
    assert "SmolLM2" not in header and "2308.09583" in header


def _irm_checkpoint(store: DatasetStore, tmp_path: Path):
    folder = tmp_path / "irm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return store.write_folder(
        "irm_model", folder, kind="model", stage="train_irm", code_version="t", params={}
    )


def test_the_data_flow_pins_the_newest_irm_or_runs_without_one(evolforge_home, tmp_path, capsys):
    params = load_params(PAPER, [], "data")
    assert isinstance(params, DataParams)
    # A fresh data home: no IRM yet; the rounds run without the rule, and the log says so.
    assert pin_irm(params).elimination.irm_model is None
    assert "no irm_model trained yet" in capsys.readouterr().out
    manifest = _irm_checkpoint(DatasetStore(evolforge_home), tmp_path)
    pinned = pin_irm(params).elimination
    assert pinned.irm_model == f"irm_model@{manifest.version}"
    assert pinned.fingerprint()["irm_model"] == f"irm_model@{manifest.version}"
    # A version or a folder is used as given.
    exact = params.model_copy(
        update={"elimination": params.elimination.model_copy(update={"irm_model": "irm_model@x"})}
    )
    assert pin_irm(exact).elimination.irm_model == "irm_model@x"
