"""The training flow on a tiny model: SFT, IRM, PRM and RL checkpoints with lineage in the
models view, the curves, the summary; a rerun trains nothing; a set with no train rows is
skipped with a reason."""

from __future__ import annotations

import polars as pl
import pytest

import tasks.training.reward as reward_mod
from flows.reports.training import render_training_summary as render_summary
from flows.training import TrainingParams, TrainingState, training
from flows.training_sets import TrainingSetsParams, TrainingSetsState, training_sets
from storage.catalog import Catalog
from storage.datasets import DatasetStore
from storage.settings import home
from tasks.training.config import TrainingConfig
from tasks.training.sets import TrainingSetParams
from tests.tasks.training.synthetic import write_all


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tasks.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def segmenter(monkeypatch):
    try:
        from tasks.rewards.steps import segment_steps  # noqa: F401
    except ImportError:
        monkeypatch.setattr(reward_mod, "default_segmenter", lambda: lambda t: t.splitlines(True))


def _artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    wanted = ["train-sft-progress", "train-rl-progress", "training-report"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=wanted))
        )
    return {a.key for a in found}


def _params(tiny, **changes):
    small = {"max_steps": 1, "max_length": 128, "eval_rows": 2}
    sections = {
        "sft": small,
        "irm": small,
        "prm": {**small, "processbench_limit": 0},
        "rl": {**small, "num_generations": 2, "sampling": {"max_tokens": 8}},
    }
    for name, change in changes.items():
        sections[name] = {**sections[name], **change}
    return TrainingParams(training=TrainingConfig(base_model=str(tiny), **sections))


def test_training_flow_makes_four_checkpoints_with_lineage(
    prefect_harness, evolforge_home, tiny, segmenter
):
    store = DatasetStore(home())
    write_all(store)
    sets = training_sets(
        params=TrainingSetsParams(training_sets=TrainingSetParams(split={"test_fraction": 0.3}))
    )
    state = training(params=_params(tiny), inputs=TrainingState.from_states(sets))
    for name in ("sft_model", "irm_model", "prm_model", "rl_model", "training_curves"):
        assert getattr(state, name) is not None, name
    rl = store.manifest(state.rl_model)
    assert set(rl.parents) == {
        str(state.rl_prompts),
        str(state.sft_model),
        str(state.irm_model),
        str(state.prm_model),
    }
    _, rows = Catalog(evolforge_home).query("SELECT name FROM models ORDER BY name")
    assert [r[0] for r in rows] == ["irm_model", "prm_model", "rl_model", "sft_model"]
    text = render_summary(state)
    assert "AutoModelForCausalLM.from_pretrained(" in text and "rl_model" in text
    # Prefect artifacts: a progress bar per trainer, the report with the curves.
    keys = _artifact_keys()
    assert {"train-sft-progress", "train-rl-progress", "training-report"} <= keys
    # A standalone run reads the newest training sets; nothing changed, so nothing is trained.
    again = training(params=_params(tiny))
    assert all(step.cached for step in again.steps)
    assert again.rl_model == state.rl_model


def test_a_set_without_train_rows_is_skipped_and_rl_uses_the_r_i_column(
    prefect_harness, evolforge_home, tiny, segmenter
):
    store = DatasetStore(home())
    refs = write_all(store)
    sets = training_sets(
        params=TrainingSetsParams(training_sets=TrainingSetParams(split={"test_fraction": 0.3})),
        inputs=TrainingSetsState(**{k: v for k, v in refs.items()}),
    )
    # Every IRM pair inconsistent: with consistent_only (the default) there is nothing to train.
    pairs = store.read(sets.irm_set).with_columns(pl.lit(False).alias("consistent"))
    irm_set = store.write("irm_set", pairs, stage="t", code_version="t", params={}).ref
    state = training(
        params=_params(tiny, rl={"judge_fallback": False}),
        inputs=TrainingState(
            sft_set=sets.sft_set, irm_set=irm_set, prm_steps=sets.prm_steps,
            rl_prompts=sets.rl_prompts,
        ),
    )  # fmt: skip
    assert state.irm_model is None and state.sft_model is not None and state.prm_model is not None
    # Without an IRM and without the judge, rI comes from the rl_prompts' r_i column alone.
    rl = store.manifest(state.rl_model)
    assert rl.stats["rI_source"] == "r_i column" and rl.stats["rA_source"] == "prm_model"
    assert str(state.irm_set) not in rl.parents


@pytest.mark.slow
def test_the_flow_launches_each_trainer_in_two_processes_with_the_one_process_shapes(
    prefect_harness, evolforge_home, tiny, segmenter
):
    """`training.launcher.processes: 2` (CPU, gloo) against the default: each of the four
    checkpoints has the one-process run's files, config and stats keys (about 2 minutes)."""
    import json

    from tasks.training.launch import LauncherParams

    store = DatasetStore(home())
    write_all(store)
    sets = training_sets(
        params=TrainingSetsParams(training_sets=TrainingSetParams(split={"test_fraction": 0.3}))
    )
    inputs = TrainingState.from_states(sets)
    one = training(params=_params(tiny), inputs=inputs)
    params = _params(tiny)
    params.training.launcher = LauncherParams(processes=2)
    two = training(params=params, inputs=inputs)
    for name in ("sft_model", "irm_model", "prm_model", "rl_model"):
        a, b = store.manifest(getattr(one, name)), store.manifest(getattr(two, name))
        assert a.version != b.version, name
        assert b.stats["processes"] == 2 and a.stats["processes"] == 1, name
        assert a.stats.keys() == b.stats.keys(), name
        paths = [{f["path"] for f in m.files if not f["path"].startswith("logs/")} for m in (a, b)]
        assert paths[0] == paths[1], name
        assert any(f["path"].startswith("logs/events.out.tfevents") for f in b.files), name
        folders = [store.version_dir(m.name, m.version) for m in (a, b)]
        configs = [json.loads((f / "config.json").read_text()) for f in folders]
        assert configs[0] == configs[1], name
    rl = store.manifest(two.rl_model)
    assert rl.stats["rA_source"] == "prm_model" and rl.stats["eval_prompts"] > 0
    assert "train-rl-progress" in _artifact_keys()
