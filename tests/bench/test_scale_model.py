"""bench/scale_model.py on a tiny synthetic demo home: the projection's arithmetic and its
one-line error for a home without the stats it needs."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from bench import scale_model as sm
from flows.registry import load_params
from storage.datasets import DatasetStore
from storage.request_cache import RequestCache

ROOT = Path(__file__).resolve().parents[2]
PAPER = str(ROOT / "configs" / "paper.yaml")

SEEDS = 4
ROUNDS = 2


def engine(requests, prompt, completion, hits=0):
    return {
        "requests": requests,
        "hits": hits,
        "misses": requests - hits,
        "failures": 0,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "engine_seconds": 1.0,
    }


def _write(store, name, rows, stage, stats, params=None, round=None):
    frame = pl.DataFrame({"id": [f"{name}-{round}-{i}" for i in range(rows)]})
    recorded = {"params": params or {}}
    if round is not None:
        recorded["round"] = round
    return store.write(name, frame, stage=stage, code_version="c", params=recorded, stats=stats)


def make_home(home: Path, skip: str | None = None, engine_override=None) -> Path:
    """A demo-shaped home: SEEDS seeds, ROUNDS rounds, every LLM stage with known counters."""
    store = DatasetStore(home)
    sft_engine = engine_override or engine(4, 400, 80)
    datasets = [
        ("seeds", SEEDS, "ingest", {"accepted": SEEDS}, {}),
        ("sft_answers", SEEDS, "sft_answers", {"engine": sft_engine}, {"samples_per_seed": 1}),
        ("instructions", SEEDS * 3, "combine", {}, {}),  # 1 + 1 kept per seed and round
        (
            "solutions",
            SEEDS * 3 * 2,
            "solve",
            {"engine": engine(24, 2400, 960), "instructions": SEEDS * 3},
            {"k_cot": 1, "k_pot": 1},
        ),
        (
            "siblings",
            8,
            "evolve_siblings",
            {"engine": engine(8, 800, 160), "eligible_parents": 8, "parents": 4},
            {"k": 2},
        ),
        (
            "instruction_rankings",
            4,
            "rank_siblings",
            {"engine": engine(8, 1600, 160), "groups": 4},
            {},
        ),
        ("step_judgments", 3, "judge_steps", {"engine": engine(3, 300, 30), "solutions": 3}, {}),
        (
            "step_rollouts",
            6,
            "rollout_steps",
            {"engine": engine(6, 600, 120), "solutions": 3},
            {"n": 2},
        ),
        (
            "eval_results",
            20,
            "evaluate",
            {"engine": engine(30, 3000, 600, hits=10), "requests": 20},
            {},
        ),
    ]
    for name, rows, stage, stats, params in datasets:
        if name != skip:
            _write(store, name, rows, stage, stats, params)
    for r in range(1, ROUNDS + 1):
        if skip != "evolutions":
            _write(
                store,
                "evolutions",
                SEEDS,
                "evolve",
                {"engine": engine(SEEDS, 300 * SEEDS, 50 * SEEDS), "parents": SEEDS},
                {"evolutions_per_parent": 1},
                round=r,
            )
        _write(
            store,
            "elimination",
            SEEDS,
            "eliminate",
            {"engine": engine(2, 200, 40), "generated": SEEDS},
            {"equal_judge": False, "solvable_judge": False},
            round=r,
        )
    cache = RequestCache(home / "cache" / "requests")
    two = {
        "completions": [
            {"text": "a", "finish_reason": "stop", "completion_tokens": 20},
            {"text": "b", "finish_reason": "stop", "completion_tokens": 20},
        ],
        "prompt_tokens": 100,
        "latency_s": 0.1,
        "error": None,
    }
    cache.put_many([(f"{i:064x}", two) for i in range(24)], stage="solve")
    cache.close()
    return home


@pytest.fixture
def home(tmp_path) -> Path:
    return make_home(tmp_path / "demo")


@pytest.fixture(scope="module")
def paper():
    return sm.paper_sizes(load_params(PAPER, []))


def by_stage(demo, paper, seeds, ips=3.0):
    return {r.stage: r for r in sm.project(demo, paper, seeds, ips)}


def test_the_paper_profile_is_read_through_the_loader(paper):
    params = load_params(PAPER, [])
    assert paper.rounds == params.evolution.rounds == 8
    assert (paper.k_cot, paper.k_pot) == (params.solutions.k_cot, params.solutions.k_pot)
    assert paper.mc_n == params.rewards.monte_carlo.n
    more = sm.paper_sizes(load_params(PAPER, ["solutions.k_cot=8", "evolution.rounds=4"]))
    assert (more.k, more.rounds) == (paper.k + 4, 4)
    # 1319 + 500 + 1000 + 2215 + 2065 + 32 + 3018 items, 3 models, 2 modes
    assert paper.eval_requests == 10_149 * 3 * 2


def test_per_unit_rates_are_projected_with_the_paper_factors(home, paper):
    demo = sm.read_demo(home)
    assert demo.units["evolve"] == SEEDS * ROUNDS and demo.sizes["rounds"] == ROUNDS
    rows = by_stage(demo, paper, 15_000)
    sft = rows["sft_answers"]
    # 1 request a seed in the demo, 4 samples per seed in the paper; 100 + 20 tokens a request
    assert sft.requests == 15_000 * 4
    assert (sft.prompt_tokens, sft.completion_tokens) == (6_000_000, 1_200_000)
    # one parent per seed and round, 8 rounds
    assert rows["evolve"].requests == 15_000 * 8
    # two judges on in the paper, none in the demo: 3x the probe's requests
    assert rows["eliminate"].requests == pytest.approx(15_000 * 8 * 0.5 * 3)
    # CoT and PoT are one request each whatever k: requests per instruction stay, completions
    # (2 a request in the cache) and their tokens grow with k_cot + k_pot (8 / 2)
    solve = rows["solve"]
    assert solve.requests == pytest.approx(15_000 * 3 * 2)
    assert solve.completion_tokens == pytest.approx(solve.sent * 40 * 4)
    assert solve.completions == pytest.approx(solve.sent * 2 * 4)
    assert solve.completion_tokens_at_caps == pytest.approx(solve.completions * (1024 + 768) / 2)
    # eval: the within-run hits are not sent
    ev = rows["evaluate"]
    assert ev.requests == paper.eval_requests * 1.5 and ev.sent == pytest.approx(
        ev.requests * 2 / 3
    )


def test_doubling_the_seeds_doubles_the_seed_driven_work_not_the_capped_work(home, paper):
    demo = sm.read_demo(home)
    one, two = by_stage(demo, paper, 100_000), by_stage(demo, paper, 200_000)
    for stage in ("sft_answers", "evolve", "eliminate", "solve", "evolve_siblings"):
        assert two[stage].requests == pytest.approx(2 * one[stage].requests)
        assert two[stage].prompt_tokens == pytest.approx(2 * one[stage].prompt_tokens)
        assert two[stage].completion_tokens == pytest.approx(2 * one[stage].completion_tokens)
    # step labels stop at max_solutions_per_round a round; evaluation is the benchmarks' size
    for stage in ("judge_steps", "rollout_steps", "evaluate"):
        assert two[stage].requests == one[stage].requests
    assert one["judge_steps"].units == paper.max_solutions_per_round * (paper.rounds + 1)
    small = sm.storage(demo, paper, 100_000, 3.0)
    large = sm.storage(demo, paper, 200_000, 3.0)
    assert large["seeds"]["bytes"] == pytest.approx(2 * small["seeds"]["bytes"])
    assert large["seeds"]["bytes_per_row"] == small["seeds"]["bytes_per_row"]
    assert large["eval_results"]["bytes"] == small["eval_results"]["bytes"]


def test_gpu_hours_are_tokens_over_throughput(home, paper):
    demo = sm.read_demo(home)
    for r in sm.project(demo, paper, 15_000, 3.0):
        expected = (r.completion_tokens / 1000 + r.prompt_tokens / 8000) / 3600
        assert r.gpu_hours(1000, 8000) == pytest.approx(expected)
        caps = (r.completion_tokens_at_caps / 1000 + r.prompt_tokens / 8000) / 3600
        assert r.gpu_hours(1000, 8000, at_caps=True) == pytest.approx(caps)
    # halving the throughput doubles the hours
    r = sm.project(demo, paper, 15_000, 3.0)[0]
    assert r.gpu_hours(500, 4000) == pytest.approx(2 * r.gpu_hours(1000, 8000))


def test_the_report_prints_tables_and_states_its_throughput(home, capsys):
    code = sm.main(
        ["--home", str(home), "--seeds", "1000", "--gpus", "1", "4",
         "--tokens-per-s-per-gpu", "1000", "--prefill-tokens-per-s-per-gpu", "10000"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "1,000 generated + 10,000 prompt tokens/s per GPU, an ASSUMPTION" in out
    assert "H100" in out and "| **total** |" in out
    demo = sm.read_demo(home)
    paper = sm.paper_sizes(load_params(PAPER, []))
    ips = sm.instructions_per_seed(demo, paper)
    assert ips == pytest.approx(1 + 1 * 8)  # one kept evolution per seed and round, 8 rounds
    hours = sum(r.gpu_hours(1000, 10000) for r in sm.project(demo, paper, 1000, ips))
    assert f"| 4 | {hours / 4:,.2f} |" in out
    assert "Request cache" in out and "Run lock" in out and "Catalog" in out


@pytest.mark.parametrize("missing", ["step_rollouts", "evolutions"])
def test_a_home_without_a_dataset_is_one_line_naming_it(tmp_path, capsys, missing):
    home = make_home(tmp_path / "demo", skip=missing)
    assert sm.main(["--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no dataset {missing!r}" in err


def test_a_manifest_without_an_engine_field_is_one_line_naming_it(tmp_path, capsys):
    counters = engine(4, 400, 80)
    del counters["prompt_tokens"]
    home = make_home(tmp_path / "demo", engine_override=counters)
    assert sm.main(["--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "sft_answers@" in err and "'prompt_tokens'" in err


def test_an_empty_folder_is_not_a_home(tmp_path, capsys):
    assert sm.main(["--home", str(tmp_path / "nothing")]) == 2
    assert "not a data home" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()  # nothing created where it looked


def test_the_home_is_only_read(home):
    before = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    sm.main(["--home", str(home), "--seeds", "10"])
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == before
