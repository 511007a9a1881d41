"""A version never depends on where the home or the project lives: a home built by the data flow
and the evaluation flow (seeds from the built-in sample, decontamination against the benchmark
files, a checkpoint evaluated and guarded), then moved together with the sample seeds and the
shared benchmark files to other folders, reruns as cache hits: the same versions, no new
version, no engine request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import infra.engines as engines
import tasks.seeds as seeds_mod
from flows.data import data
from flows.evaluation import EvaluationParams, evaluation
from flows.params import DataParams
from infra.models import resolve_model
from storage.datasets import DatasetStore
from tasks.benchmarks import REGISTRY
from tests.fakes import ScriptedEngine
from tests.flows.test_data import TEMPLATES, scripted_reply
from tests.flows.test_evaluation import write_checkpoint

BENCHMARK_FILES = ["gsm8k/test.jsonl", "math/test.jsonl", REGISTRY["gsm8k"].file]


def reply(request, i: int) -> str:
    """The data flow's script; any evaluation prompt gets a plain answer."""
    from tasks.templates import load_template

    if request.template_version in {load_template(name).version for name in TEMPLATES}:
        return scripted_reply(request, i)
    return "The answer is: 0"


@pytest.fixture
def scripted(monkeypatch):
    """One scripted engine per configured model, identified as the real engines identify it
    (`infra.models.resolve_model`; the packaged model, unused here, as `base`)."""
    built: dict[str, ScriptedEngine] = {}

    def build(config):
        model = config.model
        identity = resolve_model(model).identity if model else "base"
        built[str(model)] = ScriptedEngine(reply, identity=f"scripted:{identity}")
        return built[str(model)]

    monkeypatch.setattr(engines, "_build", build)
    engines._engines.clear()
    yield built
    engines._engines.clear()


def place(monkeypatch, home: Path, shared: Path, sample: Path) -> None:
    monkeypatch.setenv("EVOLFORGE_HOME", str(home))
    monkeypatch.setenv("EVOLFORGE_SHARED_DATA", str(shared))
    monkeypatch.setattr(seeds_mod, "SAMPLE_PATH", sample)
    engines._engines.clear()


def run_flows():
    data_params = DataParams.model_validate(
        {
            "seeds": {"sources": [{"kind": "sample", "limit": 6}]},
            "sft": {"enabled": False},
            "evolution": {"rounds": 1},
            "solutions": {"enabled": False},
        }
    )
    eval_params = EvaluationParams.model_validate(
        {
            "models": ["base", "sft=sft_model"],
            "benchmarks": ["gsm8k"],
            "modes": ["cot"],
            "limit": 2,
            "sandbox": {"workers": 1},
        }
    )
    return data(data_params), evaluation(eval_params)


def test_a_moved_home_checkout_and_shared_data_rerun_as_cache_hits(
    prefect_harness, tmp_path, monkeypatch, scripted, shared_data
):
    first, second = tmp_path / "first", tmp_path / "second"
    for name in BENCHMARK_FILES:
        (first / "shared" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / name, first / "shared" / name)
    (first / "checkout").mkdir()
    shutil.copy(seeds_mod.SAMPLE_PATH, first / "checkout" / "sample_seeds.jsonl")
    (first / "home").mkdir()
    place(monkeypatch, first / "home", first / "shared", first / "checkout" / "sample_seeds.jsonl")
    question = json.loads((first / "shared" / REGISTRY["gsm8k"].file).open().readline())
    write_checkpoint(first / "home", tmp_path, question["question"])

    built_data, built_eval = run_flows()
    stages = {s.stage for s in built_data.steps + built_eval.steps if not s.cached}
    assert {"ingest", "dedup", "eval_contamination", "eval_requests"} <= stages
    store = DatasetStore(first / "home")
    versions = {name: [v.version for v in store.versions(name)] for name in store.names()}
    calls = sum(len(engine.calls) for engine in scripted.values())
    assert calls > 0

    # Everything moves: the old places no longer exist.
    shutil.move(first, second)
    place(
        monkeypatch, second / "home", second / "shared", second / "checkout" / "sample_seeds.jsonl"
    )
    again_data, again_eval = run_flows()
    assert again_data.refs() == built_data.refs()
    assert again_eval.refs() == built_eval.refs()
    assert [s.stage for s in again_data.steps + again_eval.steps if not s.cached] == []
    store = DatasetStore(second / "home")
    assert {name: [v.version for v in store.versions(name)] for name in store.names()} == versions
    assert sum(len(engine.calls) for engine in scripted.values()) == calls
