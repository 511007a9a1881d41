"""The training report: curves PNG artifact, summary lines with metrics and how to load each
model, markdown; every printed query runs on a fresh catalog and the lineage reaches the seeds."""

from __future__ import annotations

import json

import pytest

from storage.catalog import Catalog
from storage.datasets import DatasetStore
from storage.settings import home
from tasks.training.report import (
    CURVES_FILE,
    TRAINING_QUERIES,
    draw_training_curves,
    render_training_summary,
    training_report_markdown,
)
from tasks.training.sets import SftSetParams, SplitParams, build_sft_set
from tests.tasks.training.synthetic import write_all


def _fake_model(store, name, parents, history, stats):
    folder = store.root / f".src-{name}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "training_log.json").write_text(json.dumps(history))
    manifest = store.write_folder(
        name, folder, kind="model", stage=f"train_{name}", code_version="t", params={},
        parents=parents, stats=stats,
    )  # fmt: skip
    Catalog(store.home).register(manifest)
    return manifest.ref


@pytest.fixture()
def trained(evolforge_home):
    store = DatasetStore(home())
    refs = write_all(store)
    catalog = Catalog(store.home)
    for ref in refs.values():
        catalog.register(store.manifest(ref))
    sft_set = build_sft_set.run(
        seeds=refs["seeds"], instructions=refs["instructions"], sft_answers=refs["sft_answers"],
        solutions=refs["solutions"], answers=refs["answers"], split=SplitParams(test_fraction=0.3),
        params=SftSetParams(),
    )["sft_set"]  # fmt: skip
    sft = _fake_model(
        store, "sft_model", [sft_set], [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}],
        {"steps": 2, "loss_first": 2.0, "loss_last": 1.0, "eval_loss": 1.5},
    )  # fmt: skip
    rl = _fake_model(
        store, "rl_model", [sft, refs["instructions"]],
        [{"step": 1, "reward": 0.2, "rI": 0.5, "rA": 0.4}, {"step": 2, "reward": 0.3, "rI": 0.5, "rA": 0.6}],
        {"steps": 2, "reward_first": 0.2, "reward_last": 0.3, "rI_last": 0.5, "rA_last": 0.6,
         "resumed_from_step": 1},
    )  # fmt: skip
    return store, sft_set, sft, rl


def test_curves_stage_draws_every_model_it_is_given(trained):
    store, _, sft, rl = trained
    result = draw_training_curves.run(sft_model=sft, irm_model=None, prm_model=None, rl_model=rl)
    png = store.version_dir("training_curves", result.version) / CURVES_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stats == {
        "models": ["rl_model", "sft_model"],
        "points": {"sft_model": 2, "rl_model": 2},
    }
    assert store.manifest(result["training_curves"]).kind == "plot"


def test_summary_and_markdown_show_sizes_metrics_and_how_to_load(trained):
    from flows.training import TrainingState

    store, sft_set, sft, rl = trained
    curves = draw_training_curves.run(sft_model=sft, irm_model=None, prm_model=None, rl_model=rl)
    state = TrainingState(
        sft_set=sft_set, sft_model=sft, rl_model=rl, training_curves=curves["training_curves"]
    )
    text = render_training_summary(state)
    assert f"sft_set    {sft_set}  rows" in text and "train " in text and "test " in text
    assert "cot " in text or "pot " in text
    folder = store.version_dir("sft_model", sft.version)
    assert f"load: AutoModelForCausalLM.from_pretrained('{folder}')" in text
    assert "loss_first 2.000, loss_last 1.000, eval_loss 1.500" in text
    assert "(resumed at 1)" in text and f"parents {sft_set}" in text
    rl_line = next(line for line in text.splitlines() if line.startswith("  rl_model"))
    assert str(sft) in rl_line  # the RL checkpoint names the SFT checkpoint it started from
    markdown = training_report_markdown(state)
    assert "## Models" in markdown and "data:image/png;base64," in markdown


def test_printed_queries_run_and_trace_a_checkpoint_to_its_seeds(trained):
    store, *_ = trained
    catalog = Catalog(store.home)
    for query in TRAINING_QUERIES:
        catalog.query(query)
    _, rows = catalog.query(TRAINING_QUERIES[-1])
    names = {name for _, name, _ in rows}
    assert {"rl_model", "sft_model", "sft_set", "seeds", "instructions"} <= names
