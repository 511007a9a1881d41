"""The evaluation flow with scripted engines (one per model): results, scores with intervals, the
contamination guard through a synthetic checkpoint's lineage, the chart, the Prefect artifacts,
the summary's queries, reruns as cache hits, and the CLI's parameters."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

import infra.engines as engines
from flows.evaluation import EvaluationParams, eval_params_from_cli, evaluation
from flows.params import ConfigError
from flows.reports.evaluation import EVAL_QUERIES, render_evaluation_summary
from storage.catalog import Catalog
from storage.datasets import DatasetStore
from tasks.benchmarks import benchmark_source, read_items
from tests.fakes import ScriptedEngine, last_user_message

LIMIT = 3


@pytest.fixture
def references(shared_data) -> dict[str, str]:
    items = pl.concat([read_items(benchmark_source(b), LIMIT, 0) for b in ("gsm8k", "math500")])
    return dict(zip(items["question"], items["answer"], strict=True))


@pytest.fixture
def scripted(monkeypatch, references):
    """The checkpoint answers every question right (CoT and PoT); the base says 0 and writes
    no programs, so its hybrid falls back every time."""
    built: dict[str, ScriptedEngine] = {}

    def build(config):
        trained = config.model is not None

        def reply(request, i):
            text = last_user_message(request)
            answer = next(a for q, a in references.items() if q in text)
            if "Let's write a program" in text:
                return f"```python\nprint({answer!r})\n```" if trained else "No code today."
            return f"Step 1.\nThe answer is: {answer}" if trained else "The answer is: 0"

        name = config.model or "base"
        built[name] = ScriptedEngine(reply, identity=f"scripted:{name}")
        return built[name]

    monkeypatch.setattr(engines, "_build", build)
    engines._engines.clear()
    yield built
    engines._engines.clear()


def write_checkpoint(home: Path, tmp_path: Path, question: str):
    """An SFT checkpoint whose training set holds `question` (its manifest)."""
    store = DatasetStore(home)
    sft_set = store.write(
        "sft_set",
        pl.DataFrame({"prompt": [question, "What is 2 + 2?"], "completion": ["a", "b"]}),
        stage="build_sft_set",
        code_version="t",
        params={},
    )
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return store.write_folder(
        "sft_model",
        folder,
        kind="model",
        stage="train_sft",
        code_version="t",
        params={},
        parents=[str(sft_set.ref)],
    )


@pytest.fixture
def checkpoint(evolforge_home, tmp_path, references):
    """An SFT checkpoint whose training set holds one of the evaluated GSM8K questions."""
    return write_checkpoint(evolforge_home, tmp_path, next(iter(references)))


def params(**overrides) -> EvaluationParams:
    data = {
        "models": ["base", "sft=sft_model"],
        "benchmarks": ["gsm8k", "math500"],
        "modes": ["cot", "hybrid"],
        "limit": LIMIT,
        "sandbox": {"workers": 1},
    }
    data.update(overrides)
    return EvaluationParams.model_validate(data)


def test_evaluation_flow(prefect_harness, evolforge_home, scripted, checkpoint):
    state = evaluation(params())
    store = DatasetStore(evolforge_home)
    results = store.read(state.eval_results)
    assert results.height == 2 * 2 * LIMIT * 2  # models x benchmarks x items x modes
    assert results["id"].n_unique() == results.height
    scores = store.read(state.eval_scores)
    rows = {(r["model"], r["benchmark"], r["mode"]): r for r in scores.to_dicts()}
    assert len(rows) == 8
    sft = rows[("sft", "gsm8k", "cot")]
    assert (sft["accuracy"], sft["n"], sft["prompt_format"]) == (1.0, LIMIT, "alpaca")
    assert sft["ci_low"] == pytest.approx(0.43850, abs=1e-4) and sft["ci_high"] == 1.0
    assert rows[("sft", "gsm8k", "hybrid")]["fallback_rate"] == 0.0
    base = rows[("base", "math500", "hybrid")]
    assert base["accuracy"] == 0.0 and base["fallback_rate"] == 1.0
    assert base["prompt_format"] == "alpaca"  # auto: WizardMath's prompt for every model
    # The guard: one evaluated GSM8K question is in the checkpoint's SFT set; the base is unknown.
    assert sft["contaminated"] == 1 and rows[("sft", "math500", "cot")]["contaminated"] == 0
    assert base["contaminated"] is None
    flagged = store.read(state.eval_contamination).filter(pl.col("contaminated"))
    assert flagged.select("model", "benchmark").rows() == [("sft", "gsm8k")]
    assert flagged["training_set"][0].startswith("sft_set@")

    # Each model ran on its own engine; the hybrid fallback came from the cache.
    assert set(results["engine_identity"]) == {
        "scripted:base",
        f"scripted:{store.version_dir('sft_model', checkpoint.version)}",
    }
    evaluate = next(s for s in state.steps if s.stage == "evaluate")
    assert evaluate.stats["shards"]["total"] == 2
    assert evaluate.stats["engine"]["hits"] == 2 * LIMIT  # base's fallbacks = its cot requests

    # The chart, the catalog, the queries the summary prints, the Prefect artifacts.
    chart = store.version_dir("eval_chart", state.eval_chart.version) / "eval_scores.png"
    assert chart.read_bytes().startswith(b"\x89PNG")
    catalog = Catalog(evolforge_home)
    summary = render_evaluation_summary(state)
    for query in EVAL_QUERIES:
        assert f'evolforge sql "{query}"' in summary
        _, found = catalog.query(query)
        assert found, query
    assert "sft" in summary and "100.0 [43.9, 100.0] n=3" in summary
    assert "contamination base: unknown" in summary
    assert "contamination sft: 1 evaluated items found in its training sets" in summary
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"eval-comparison", "eval-report"} <= keys

    # A rerun is all cache hits: no engine requests, no new versions.
    calls = {name: len(engine.calls) for name, engine in scripted.items()}
    versions = {name: len(store.versions(name)) for name in store.names()}
    again = evaluation(params())
    assert again.refs() == state.refs()
    assert all(step.cached for step in again.steps)
    assert {name: len(engine.calls) for name, engine in scripted.items()} == calls
    assert {name: len(store.versions(name)) for name in store.names()} == versions


def test_a_larger_limit_reuses_the_smaller_runs_answers(
    prefect_harness, evolforge_home, scripted, checkpoint
):
    evaluation(params(models=["sft=sft_model"], modes=["cot"], limit=2))
    engine = next(iter(scripted.values()))
    first = len(engine.calls)
    state = evaluation(params(models=["sft=sft_model"], modes=["cot"], limit=LIMIT))
    # Only the new items' requests reach the engine (the seeded subsets are nested).
    assert len(engine.calls) - first == 2 * (LIMIT - 2)
    assert DatasetStore(evolforge_home).read(state.eval_results).height == 2 * LIMIT


def test_cli_parameters(tmp_path):
    params = eval_params_from_cli(
        ["base", "sft_model"], ["gsm8k", "math500"], ["cot", "hybrid"], 200
    )
    assert (params.models, params.benchmarks, params.modes, params.limit) == (
        ["base", "sft_model"],
        ["gsm8k", "math500"],
        ["cot", "hybrid"],
        200,
    )
    config = tmp_path / "profile.yaml"
    config.write_text(
        "evaluation:\n  modes: [cot]\n  k: 4\n  engine: {kind: embedded, dtype: bfloat16}\n"
        "  decoding: {cot_max_tokens: 96}\n"
    )
    params = eval_params_from_cli(
        [], [], ["maj@k"], None, config=config, overrides=["decoding.pot_max_tokens=64"]
    )
    assert params.modes == ["maj@k"] and params.mode_labels() == ["maj@4"]
    assert params.engine.dtype == "bfloat16"
    assert (params.decoding.cot_max_tokens, params.decoding.pot_max_tokens) == (96, 64)
    assert params.models == ["base"]  # the default
    with pytest.raises(ConfigError, match=r"unknown benchmark\(s\) gsm9k"):
        eval_params_from_cli(["base"], ["gsm9k"], ["cot"], 5)
    with pytest.raises(ConfigError, match=r"unknown mode 'cott'"):
        eval_params_from_cli(["base"], ["gsm8k"], ["cott"], 5)
    with pytest.raises(ConfigError, match=r"did you mean 'decoding.cot_max_tokens'"):
        eval_params_from_cli(["base"], ["gsm8k"], ["cot"], 5, overrides=["decoding.cot_max=5"])
    with pytest.raises(ConfigError, match="modes repeat"):
        eval_params_from_cli(["base"], ["gsm8k"], ["maj@k", "maj@8"], 5)
    with pytest.raises(ConfigError, match="no such config file"):
        eval_params_from_cli(["base"], ["gsm8k"], ["cot"], 5, config=tmp_path / "nope.yaml")


def test_benchmarks_can_come_from_a_local_file_or_the_hub(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
    params = EvaluationParams(
        benchmarks=["mine", "math500"],
        sources=[
            {"name": "mine", "format": "gsm8k", "path": str(path)},
            {"name": "math500", "hub": "HuggingFaceH4/MATH-500"},
        ],
    )
    mine, math500 = params.benchmark_sources()
    assert (mine.path, mine.layout) == (str(path), "gsm8k")
    assert (math500.hub, math500.path) == ("HuggingFaceH4/MATH-500", None)
    assert EvaluationParams(benchmarks=["svamp"]).benchmark_sources()[0].resolved_path().name == (
        "svamp.jsonl"
    )
    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) mine"):
        EvaluationParams(benchmarks=["mine"])
    with pytest.raises(ValueError, match="benchmarks repeat"):
        EvaluationParams(benchmarks=["gsm8k", "gsm8k"])


def test_models_on_vllm_take_turns_on_the_gpu(
    prefect_harness, evolforge_home, checkpoint, tmp_path, monkeypatch
):
    """Two models evaluated in one process on vLLM: the first model's LLM is shut down and
    gone before the second's is built, and the second is released when the flow ends."""
    from tests.fakes import FakeVLLM

    fake = FakeVLLM().install(monkeypatch)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    engines._engines.clear()
    try:
        state = evaluation(params(modes=["cot"], engine={"kind": "vllm", "model": str(base)}))
        sft = str(DatasetStore(evolforge_home).version_dir("sft_model", checkpoint.version))
        opened = [e[1] for e in fake.lifecycle() if e[0] == "open"]
        assert sorted(opened) == sorted([str(base), sft])  # each model loaded once
        first, second = opened
        assert fake.lifecycle() == [
            ("open", first, []),
            ("shutdown", first),
            ("destroy_model_parallel",),
            ("open", second, []),  # no LLM of the first model left alive
            ("shutdown", second),  # at the end of the flow
            ("destroy_model_parallel",),
        ]
        assert fake.alive() == []
        assert all(getattr(e, "llm", None) is None for e in engines._engines.values())
        results = DatasetStore(evolforge_home).read(state.eval_results)
        assert results["model"].n_unique() == 2 and results["error"].null_count() == results.height
    finally:
        engines._engines.clear()
