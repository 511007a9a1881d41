"""SFT: the stage writes a causal-LM checkpoint version with metrics and lineage; reruns are cache
hits; on SmolLM2 (slow) the completion loss falls on a tiny set it can memorise."""

from __future__ import annotations

import polars as pl
import pytest

from storage.catalog import Catalog
from storage.datasets import DatasetStore
from storage.settings import home
from tasks.training.common import BaseModelSpec, read_training_log
from tasks.training.sets import SftSetParams, SplitParams, build_sft_set
from tasks.training.sft import SftTrainParams, train_sft
from tests.tasks.training.synthetic import write_all


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tasks.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def _sft_set(store, test_fraction=0.3):
    refs = write_all(store)
    return build_sft_set.run(
        seeds=refs["seeds"], instructions=refs["instructions"], sft_answers=refs["sft_answers"],
        solutions=refs["solutions"], answers=refs["answers"],
        split=SplitParams(test_fraction=test_fraction), params=SftSetParams(pot_ratio=0.3),
    )["sft_set"]  # fmt: skip


def test_train_sft_stage_writes_a_loadable_checkpoint_with_metrics(evolforge_home, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = DatasetStore(home())
    sft_set = _sft_set(store)
    params = SftTrainParams(max_steps=2, max_length=128, eval_rows=4)
    result = train_sft.run(sft_set=sft_set, base_model=BaseModelSpec(name=str(tiny)), params=params)
    folder = store.version_dir("sft_model", result.version)
    AutoModelForCausalLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    stats = result.stats
    assert stats["steps"] == 2 and stats["resumed_from_step"] is None
    assert stats["eval_rows"] == 4 and stats["eval_loss"] > 0
    assert stats["train_rows"] == store.read(sft_set).filter(pl.col("split") == "train").height
    assert stats["base_model"].startswith("folder-sha256:")
    assert [h["step"] for h in read_training_log(folder) if "loss" in h] == [1, 2]
    # The models view: parents, metrics; and the lineage query reaches the seeds.
    _columns, rows = Catalog(evolforge_home).query(
        "SELECT name, parents, metrics->>'steps' FROM models"
    )
    assert rows == [("sft_model", [str(sft_set)], "2")]
    again = train_sft.run(sft_set=sft_set, base_model=BaseModelSpec(name=str(tiny)), params=params)
    assert again.cached and again.version == result.version
    # Parameters that change the model change the version.
    assert (
        train_sft.version(
            sft_set=sft_set,
            base_model=BaseModelSpec(name=str(tiny)),
            params=params.model_copy(update={"max_steps": 3}),
        )
        != result.version
    )


def test_train_sft_refuses_an_empty_train_split(evolforge_home, tiny):
    store = DatasetStore(home())
    sft_set = _sft_set(store, test_fraction=1.0)
    with pytest.raises(ValueError, match="no rows in its train split"):
        train_sft.run(
            sft_set=sft_set, base_model=BaseModelSpec(name=str(tiny)), params=SftTrainParams()
        )
    assert store.versions("sft_model") == []


@pytest.mark.slow
def test_sft_overfits_a_tiny_set_on_smollm2(evolforge_home, models_dir):
    store = DatasetStore(home())
    full = store.read(_sft_set(store, test_fraction=0.0))
    small = full.filter(pl.col("kind") == "cot").head(2)
    ref = store.write("sft_set", small, stage="t", code_version="t", params={"n": 2}).ref
    params = SftTrainParams(max_steps=8, batch_size=2, learning_rate=1e-4, max_length=160)
    result = train_sft.run(sft_set=ref, base_model=BaseModelSpec(), params=params)
    losses = [
        h["loss"]
        for h in read_training_log(store.version_dir("sft_model", result.version))
        if "loss" in h
    ]
    assert len(losses) == 8 and losses[-1] < losses[0] * 0.5


def _train_in(home_dir, monkeypatch, tiny):
    monkeypatch.setenv("EVOLFORGE_HOME", str(home_dir))
    store = DatasetStore(home())
    params = SftTrainParams(max_steps=2, max_length=128, eval_rows=4)
    result = train_sft.run(sft_set=_sft_set(store), base_model=BaseModelSpec(name=str(tiny)), params=params)  # fmt: skip
    return store.version_dir("sft_model", result.version)


def test_metrics_go_to_tensorboard_in_the_checkpoint_and_stay_out_of_its_identity(
    tmp_path, monkeypatch, tiny
):
    """Two identical trainings (two homes): event files in both, one identity (the weights)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import infra.engines.cpu as cpu
    from infra.models import local_identity

    monkeypatch.setattr(cpu, "contended_threads", lambda *a, **k: 1)  # the same arithmetic
    a = _train_in(tmp_path / "home-a", monkeypatch, tiny)
    b = _train_in(tmp_path / "home-b", monkeypatch, tiny)
    for folder in (a, b):
        events = sorted((folder / "logs").glob("events.out.tfevents.*"))
        assert events, f"no event files in {folder}/logs"
    board = EventAccumulator(str(a / "logs"))
    board.Reload()
    scalars = board.Tags()["scalars"]
    assert "train/loss" in scalars and "eval/loss" in scalars
    losses = board.Scalars("train/loss")
    logged = [h for h in read_training_log(a) if "loss" in h]
    assert [e.step for e in losses] == [h["step"] for h in logged] == [1, 2]
    assert [round(e.value, 4) for e in losses] == [round(h["loss"], 4) for h in logged]
    # the run's records differ (times, host), the model does not
    names = {p.name for p in (a / "logs").iterdir()} | {p.name for p in (b / "logs").iterdir()}
    assert len(names) > len(list((a / "logs").iterdir()))
    assert local_identity(a) == local_identity(b)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
