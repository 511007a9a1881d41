"""The training report: summary lines with metrics and how to load each model, markdown; every
printed query runs on a fresh catalog and the lineage reaches the seeds."""

from __future__ import annotations

import pytest

from flows.reports.training import (
    TRAINING_QUERIES,
    render_training_summary,
    training_report_markdown,
)
from flows.state import TrainingState
from storage.catalog import Catalog
from tasks.training.curves import draw_training_curves
from tests.tasks.training.test_curves import trained_models


@pytest.fixture()
def trained(evolforge_home):
    return trained_models()


def test_summary_and_markdown_show_sizes_metrics_and_how_to_load(trained):
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
