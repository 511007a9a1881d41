"""The training curves: one PNG panel per model it is given, stored as a plot artifact."""

from __future__ import annotations

import json

import pytest

from storage.catalog import Catalog
from storage.datasets import DatasetStore
from storage.settings import home
from tasks.training.curves import CURVES_FILE, draw_training_curves
from tasks.training.sets import SftSetParams, SplitParams, build_sft_set
from tests.tasks.training.synthetic import write_all


def fake_model(store, name, parents, history, stats):
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


def trained_models():
    """An SFT set and two fake checkpoints (SFT, RL) with training logs, in the catalog."""
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
    sft = fake_model(
        store, "sft_model", [sft_set], [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}],
        {"steps": 2, "loss_first": 2.0, "loss_last": 1.0, "eval_loss": 1.5},
    )  # fmt: skip
    rl = fake_model(
        store, "rl_model", [sft, refs["instructions"]],
        [{"step": 1, "reward": 0.2, "rI": 0.5, "rA": 0.4}, {"step": 2, "reward": 0.3, "rI": 0.5, "rA": 0.6}],
        {"steps": 2, "reward_first": 0.2, "reward_last": 0.3, "rI_last": 0.5, "rA_last": 0.6,
         "resumed_from_step": 1},
    )  # fmt: skip
    return store, sft_set, sft, rl


@pytest.fixture()
def trained(evolforge_home):
    return trained_models()


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
