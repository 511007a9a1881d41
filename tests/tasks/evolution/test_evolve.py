"""Evolution operations: templates, the reply parser, the seeded operation draw, request and
instruction building."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import polars as pl
import pytest
from pydantic import ValidationError

from infra.engines.base import ChatResponse, Completion, SamplingParams
from tasks.evolution.evolve import (
    DOWNWARD_OPS,
    OPERATIONS,
    UPWARD_OPS,
    EvolutionMix,
    build_evolution_requests,
    draw_operations,
    evolution_id,
    make_instructions,
    parse_evolution,
)
from tasks.evolution.records import Evolution
from tasks.templates import PROMPTS_DIR, load_template

PROBLEM = r"If $\frac{x}{2} + 3 = 7$, what is the value of $x$?"
FORBIDDEN = ("#The Given Prompt#", "#Rewritten Prompt#", "given prompt", "rewritten prompt")


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_evolution_template_renders_with_problem_verbatim(op):
    tpl = load_template(OPERATIONS[op].template)
    messages = tpl.messages(problem=PROBLEM)
    # One worked example (user, assistant), then the problem to evolve.
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    user = messages[-1]["content"]
    assert PROBLEM in user  # LaTeX braces survive rendering
    assert "{{" not in user
    assert user.rstrip().endswith(("Reply with only the rewritten problem.", "new problem."))
    assert "Do not mention the rewriting or the original problem" in messages[1]["content"]
    # The example reply is itself a problem that asks something, with no heading or answer.
    example = messages[2]["content"]
    assert parse_evolution(example) == example and example.endswith("?")
    # The forbidden words are not in the prompt: quoting them made a small model copy them.
    for phrase in FORBIDDEN:
        assert phrase.lower() not in tpl.text.lower()
    # The version is the content hash of the file: an edited prompt is a new version.
    path = PROMPTS_DIR / f"{OPERATIONS[op].template}.txt"
    assert tpl.version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_upward_templates_bound_growth_and_downward_ask_for_easier():
    for op in UPWARD_OPS:
        text = load_template(OPERATIONS[op].template).text
        assert "10 to 20 words" in text and "harder" in text
    for op in DOWNWARD_OPS:
        assert "easier" in load_template(OPERATIONS[op].template).text
    assert "different topic" in load_template("evolve_new_easier_problem").text


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("judge_equal", {"first": "What is 2+3?", "second": "What is 2+3+4?"}),
        ("judge_solvable", {"problem": PROBLEM}),
        ("answer_probe", {"problem": PROBLEM}),
    ],
)
def test_judge_and_probe_templates_render(name, fields):
    messages = load_template(name).messages(**fields)
    user = messages[-1]["content"]
    for value in fields.values():
        assert value in user
    if name == "judge_equal":
        assert '{"verdict": "Equal"}' in user and '{"verdict": "Not Equal"}' in user
    if name == "judge_solvable":
        assert '"solvable": false' in user


GOOD = "A train travels 60 miles per hour for 3 hours. How far does it go?"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (GOOD, GOOD),
        (f"Sure! Here's the rewritten problem:\n\n{GOOD}\n\nAnswer: 180 miles", GOOD),
        (f"#Rewritten Prompt#:\n{GOOD}", GOOD),
        (f"#The Given Prompt#:\nHow far in 2 hours?\n#Rewritten Prompt#:\n{GOOD}", GOOD),
        (f"Rewritten problem: {GOOD}", GOOD),
        (f"New problem:\n{GOOD}\n\nSolution: 60 * 3 = 180.", GOOD),
        (f"**Problem:** {GOOD}\n\n**Solution:** 180 miles.", GOOD),
        (f"### New Problem\n{GOOD}\n\nNote: I added a time constraint.", GOOD),
        (f'"{GOOD}"', GOOD),
        (f"“{GOOD}”", GOOD),
        (f"```\n{GOOD}\n```", GOOD),
        (f"Here is the new problem:\n```text\n{GOOD}\n```\nThe answer is 180.", GOOD),
        (f"{GOOD} Answer: 180 miles", GOOD),
        (f"{GOOD} The answer is 180.", GOOD),
        (f"Okay.\n{GOOD}\nTo solve this, multiply speed by time.", GOOD),
        (f"Certainly! {GOOD}", GOOD),
        (f"{GOOD}\n\nThis rewritten problem adds a second leg to the trip.", GOOD),
        (f"{GOOD}\n\nStep 1: multiply 60 by 3.", GOOD),
        (f"{GOOD}\nHere is the solution:\n60 * 3 = 180", GOOD),
        (f"{GOOD}\n```python\nprint(60 * 3)\n```", GOOD),
        (f"Original:\nHow far in 2 hours?\n\nRewritten:\n{GOOD}\nThe answer: 180", GOOD),
        # Multi-line problems keep their lines, and a bare "Question:" inside one is content.
        (
            "Tom has 5 apples.\nQuestion: How many does he have after eating 2?",
            "Tom has 5 apples.\nQuestion: How many does he have after eating 2?",
        ),
        (r"Find $x$ if $\frac{x}{2} = 4$.", r"Find $x$ if $\frac{x}{2} = 4$."),
        ("Let $f(x) = x^2$.\nCompute $f(f(2))$.", "Let $f(x) = x^2$.\nCompute $f(f(2))$."),
        # Nothing left: None.
        ("", None),
        ("   \n\t ", None),
        (None, None),
        ("Rewritten problem:", None),
        ('""', None),
        ("```\n```", None),
    ],
)
def test_parse_evolution(raw, expected):
    assert parse_evolution(raw) == expected


def test_mix_defaults_are_uniform_within_each_direction():
    probs = EvolutionMix().probabilities()
    assert set(probs) == set(OPERATIONS)
    assert sum(probs.values()) == pytest.approx(1.0)
    for op in UPWARD_OPS:
        assert probs[op] == pytest.approx(0.5 / 3)
    for op in DOWNWARD_OPS:
        assert probs[op] == pytest.approx(0.25)


def test_mix_partial_op_weights_leave_the_others_at_zero():
    probs = EvolutionMix(upward=1, downward=0, upward_ops={"concretize": 2.0}).probabilities()
    assert probs["concretize"] == pytest.approx(1.0)
    assert probs["simplify"] == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"upward": -1}, "greater than or equal to 0"),
        ({"upward": 0, "downward": 0}, "upward + downward must be > 0"),
        ({"upward_ops": {"deepen": 1.0}}, "unknown upward operation 'deepen'"),
        ({"upward_ops": {"simplify": 1.0}}, "'simplify' is a downward operation, not upward"),
        ({"downward_ops": {"simplify": -0.5}}, "weight of 'simplify' must be >= 0"),
        ({"downward_ops": {"simplify": 0.0}}, "downward has weight 0.5 but its operation"),
    ],
)
def test_mix_rejects_bad_weights(kwargs, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        EvolutionMix(**kwargs)


def test_draws_are_deterministic_and_independent_of_other_rows():
    ids = [f"p{i}" for i in range(50)]
    mix = EvolutionMix()
    first = draw_operations(ids, seed=7, round=2, mix=mix)
    assert first == draw_operations(ids, seed=7, round=2, mix=mix)
    # Adding, removing and reordering parents leaves each parent's draw alone.
    more = dict(draw_operations([*reversed(ids), "new1", "new2"], seed=7, round=2, mix=mix))
    fewer = dict(draw_operations(ids[::3], seed=7, round=2, mix=mix))
    assert all(more[pid] == op for pid, op in first)
    assert all(fewer[pid] == dict(first)[pid] for pid in ids[::3])
    # Another round or seed draws afresh.
    assert first != draw_operations(ids, seed=7, round=3, mix=mix)
    assert first != draw_operations(ids, seed=8, round=2, mix=mix)


def test_draw_frequencies_follow_the_mix():
    ids = [f"seed-{i}" for i in range(4000)]
    mix = EvolutionMix(upward=0.75, downward=0.25, downward_ops={"simplify": 1.0})
    counts = Counter(op for _, op in draw_operations(ids, seed=0, round=1, mix=mix))
    assert counts["new_easier_problem"] == 0
    assert counts["simplify"] / len(ids) == pytest.approx(0.25, abs=0.03)
    for op in UPWARD_OPS:
        assert counts[op] / len(ids) == pytest.approx(0.25, abs=0.03)


def test_several_evolutions_per_parent_are_adjacent():
    draws = draw_operations(
        ["a", "b"], seed=0, round=1, mix=EvolutionMix(), evolutions_per_parent=3
    )
    assert [pid for pid, _ in draws] == ["a", "a", "a", "b", "b", "b"]
    assert draws[:3] == draw_operations(
        ["a"], seed=0, round=1, mix=EvolutionMix(), evolutions_per_parent=3
    )
    with pytest.raises(ValueError, match="duplicate parent ids"):
        draw_operations(["a", "a"], seed=0, round=1, mix=EvolutionMix())
    with pytest.raises(ValueError, match="evolutions_per_parent"):
        draw_operations(["a"], seed=0, round=1, mix=EvolutionMix(), evolutions_per_parent=0)


def test_evolution_id_is_short_stable_and_distinct():
    eid = evolution_id("gsm8k-12", 3, "simplify", 0)
    assert eid == evolution_id("gsm8k-12", 3, "simplify", 0)
    assert eid.startswith("r3-") and len(eid) == 15
    others = {
        evolution_id("gsm8k-12", 3, "simplify", 1),
        evolution_id("gsm8k-12", 4, "simplify", 0),
        evolution_id("gsm8k-12", 3, "concretize", 0),
        evolution_id("gsm8k-13", 3, "simplify", 0),
    }
    assert eid not in others and len(others) == 4


SEEDS = pl.DataFrame(
    {
        "id": ["s1", "s2"],
        "source": ["sample", "sample"],
        "question": [PROBLEM, "Compute $3^4$."],
    }
)


def test_build_requests_use_the_op_template_and_distinct_seeds():
    draws = [("s1", "add_constraints"), ("s2", "simplify"), ("s1", "add_constraints")]
    sampling = SamplingParams(temperature=0.7, max_tokens=200, seed=5)
    requests = build_evolution_requests(SEEDS, draws, sampling, round=1)
    assert len(requests) == 3
    assert requests[0].template_version == load_template("evolve_add_constraints").version
    assert requests[1].template_version == load_template("evolve_simplify").version
    assert PROBLEM in requests[0].messages[-1]["content"]
    assert "Compute $3^4$." in requests[1].messages[-1]["content"]
    assert requests[0].sampling.max_tokens == 200 and requests[0].sampling.temperature == 0.7
    # Same parent and op twice (k = 0, 1): different request seeds, so different cache keys.
    assert requests[0].messages == requests[2].messages
    assert requests[0].key("m") != requests[2].key("m")
    # The next round re-draws with new seeds.
    again = build_evolution_requests(SEEDS, draws, sampling, round=2)
    assert again[0].sampling.seed != requests[0].sampling.seed


def test_build_requests_reject_bad_input():
    sampling = SamplingParams()
    with pytest.raises(ValueError, match="'nobody', which is not in the parents frame"):
        build_evolution_requests(SEEDS, [("nobody", "simplify")], sampling, round=1)
    with pytest.raises(ValueError, match="n=1"):
        build_evolution_requests(SEEDS, [("s1", "simplify")], SamplingParams(n=2), round=1)
    with pytest.raises(ValueError, match="unknown evolution operation 'deepen'"):
        build_evolution_requests(SEEDS, [("s1", "deepen")], sampling, round=1)
    with pytest.raises(ValueError, match="lacks columns"):
        build_evolution_requests(SEEDS.drop("question"), [("s1", "simplify")], sampling, round=1)


def _ok(text: str, finish: str = "stop") -> ChatResponse:
    return ChatResponse(completions=[Completion(text, finish, len(text.split()))])


def test_make_instructions_keeps_every_draw_with_lineage():
    parents = pl.DataFrame(
        {"id": ["r1-aaa", "s2"], "root_id": ["s1", None], "text": [PROBLEM, "Compute $3^4$."]}
    )
    draws = [("r1-aaa", "concretize"), ("s2", "new_easier_problem"), ("s2", "simplify")]
    responses = [
        _ok(f"Rewritten problem: {GOOD}\nAnswer: 180"),
        _ok("   "),
        ChatResponse(completions=[], error="TimeoutError: took too long"),
    ]
    df = make_instructions(parents, draws, responses, "smollm2@abc", round=2)
    assert df.schema == Evolution.schema()
    rows = df.to_dicts()
    assert [r["id"] for r in rows] == [
        evolution_id("r1-aaa", 2, "concretize", 0),
        evolution_id("s2", 2, "new_easier_problem", 0),
        evolution_id("s2", 2, "simplify", 1),  # k counts the draws of one parent
    ]
    assert rows[0] | {"raw": None} == {
        "id": rows[0]["id"],
        "parent_id": "r1-aaa",
        "root_id": "s1",
        "round": 2,
        "direction": "upward",
        "op": "concretize",
        "template_version": load_template("evolve_concretize").version,
        "model": "smollm2@abc",
        "text": GOOD,
        "raw": None,
        "finish_reason": "stop",
        "error": None,
    }
    assert rows[0]["raw"].startswith("Rewritten problem:")
    # An empty output and a failed request stay, with text null, for the eliminator to record.
    assert rows[1]["text"] is None and rows[1]["raw"] == "   " and rows[1]["root_id"] == "s2"
    assert rows[1]["direction"] == "downward"
    assert rows[2]["text"] is None and rows[2]["finish_reason"] == "error"
    assert "TimeoutError" in rows[2]["error"]
    with pytest.raises(ValueError, match="2 responses for 3 draws"):
        make_instructions(parents, draws, responses[:2], "m", round=2)
