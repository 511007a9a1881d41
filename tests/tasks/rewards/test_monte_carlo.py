"""Monte Carlo step labels: soft = share reaching the target, hard = any; the final step from the
solution's own answer; unverified instructions skipped; failures and unjudged answers are null."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.rewards.monte_carlo import MonteCarloParams, monte_carlo_labels
from tasks.rewards.segment import StepParams, segment_solutions_frame
from tests.fakes import ScriptedEngine, last_user_message
from tests.tasks.rewards.helpers import (
    answers_frame,
    instructions_frame,
    seeds_frame,
    solutions_frame,
)


def segmented() -> pl.DataFrame:
    frame, _ = segment_solutions_frame(
        solutions_frame(), answers_frame(), instructions_frame(), seeds_frame(), StepParams()
    )
    return frame


def completer(request, i: int) -> str:
    """After a WRONG step nothing reaches the answer; otherwise samples 0 and 1 of every 4 do."""
    prompt = last_user_message(request)
    prefix = prompt.split("### Solution so far:\n", 1)[1]
    problem = prompt.split("### Problem:\n", 1)[1]
    if "WRONG" in prefix:
        return "The answer is: 1000"
    right = {"What is 2 + 3?": "5", "What is 2 + 3 + 4?": "9"}
    answer = next((v for k, v in right.items() if problem.startswith(k)), "7")
    return f"The answer is: {answer}" if i % 4 < 2 else "I give up."


def test_soft_and_hard_labels_from_rollouts(pool):
    engine = ScriptedEngine(completer, identity="completer")
    frame = monte_carlo_labels(segmented(), engine, MonteCarloParams(n=4), pool)
    rows = {(r["solution_id"], r["step_index"]): r for r in frame.iter_rows(named=True)}
    # a1:0 has three steps; the first two are rolled out, the last has the solution's own answer
    assert rows[("a1:0", 0)]["source"] == "rollouts" and rows[("a1:0", 0)]["n_rollouts"] == 4
    assert rows[("a1:0", 0)]["mc_soft"] == 0.5 and rows[("a1:0", 0)]["mc_hard"] is True
    assert rows[("a1:0", 2)]["source"] == "final_answer" and rows[("a1:0", 2)]["mc_soft"] == 1.0
    # a:1 goes wrong at step 0: no rollout reaches 5, and its own answer 6 is wrong
    assert rows[("a:1", 0)]["mc_soft"] == 0.0 and rows[("a:1", 0)]["mc_hard"] is False
    assert rows[("a:1", 1)]["mc_hard"] is False
    # a1:1 states no final answer: its last step is rolled out too
    assert rows[("a1:1", 1)]["source"] == "rollouts"
    # one request per rolled-out prefix, n samples each, seeded per (solution, step)
    assert all(r.sampling.n == 4 for r in engine.calls)
    assert len({r.sampling.seed for r in engine.calls}) == len(engine.calls)
    assert frame.schema["mc_soft"] == pl.Float64


def test_unverified_instructions_are_skipped_and_pot_ignored(pool):
    engine = ScriptedEngine(completer)
    frame = monte_carlo_labels(segmented(), engine, MonteCarloParams(n=2), pool)
    skipped = frame.filter(pl.col("source") == "skipped")
    assert set(skipped["solution_id"]) == {"a1x:0", "b1:0"}
    assert skipped["mc_soft"].null_count() == skipped.height
    assert skipped["note"].unique().to_list() == ["no verified answer for the instruction"]
    assert not {"a:2", "a:3", "a2:0"} & set(frame["solution_id"])
    assert not any("2 + 2" in last_user_message(r) for r in engine.calls)


def test_failed_requests_leave_labels_null(pool):
    def reply(request, i):
        raise RuntimeError("engine down")

    frame = monte_carlo_labels(segmented(), ScriptedEngine(reply), MonteCarloParams(n=2), pool)
    rolled = frame.filter(pl.col("source") == "rollouts")
    assert rolled.height > 0 and rolled["mc_hard"].null_count() == rolled.height
    assert rolled["note"].str.starts_with("engine error").all()
    finals = frame.filter(pl.col("source") == "final_answer")
    assert finals["mc_hard"].null_count() == 0  # the solutions' own answers still count


@pytest.mark.parametrize("n", [1, 3])
def test_rows_reconcile_with_steps(pool, n):
    frame = monte_carlo_labels(segmented(), ScriptedEngine(completer), MonteCarloParams(n=n), pool)
    cot = segmented().filter(pl.col("kind") != "pot")
    assert frame.height == cot["n_steps"].sum()
    rolled = frame.filter(pl.col("source") == "rollouts")
    assert (rolled["n_rollouts"] == n).all()
    assert (frame["n_correct"] <= frame["n_judged"]).all()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rollout_steps_stage_with_the_embedded_model(evolforge_home, models_dir):
    from infra.engines import EngineConfig
    from storage.datasets import DatasetStore
    from tasks.rewards.monte_carlo import rollout_steps

    store = DatasetStore(evolforge_home)
    frame = segmented().filter(pl.col("solution_id").is_in(["a1:0", "a1x:0"]))
    ref = store.write("segmented_solutions", frame, stage="test", code_version="x", params={}).ref
    result = rollout_steps.run(
        segmented_solutions=ref,
        engine=EngineConfig(kind="embedded"),
        params=MonteCarloParams(n=2, sampling={"max_tokens": 32}),
    )
    out = store.read(result["step_rollouts"])
    assert out.height == 3 + 2  # a1:0 has three steps, a1x:0 (unverified, skipped) two
    assert result.stats["engine"]["requests"] == 2 and result.stats["skipped_unverified"] == 1
    rolled = out.filter(pl.col("source") == "rollouts")
    assert (rolled["n_judged"] <= 2).all()
    known = rolled.filter(pl.col("mc_soft").is_not_null())
    assert known["mc_soft"].is_between(0, 1).all()
