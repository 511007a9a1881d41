"""Small synthetic datasets with the columns the training sets read: the data flow's (seeds,
instructions, sft_answers, solutions, answers) and the reward flow's (irm_pairs, step_labels,
rewards), written with `DatasetStore.write` into the test's data home.

Six seeds "What is a + b?" (ids s0..s5), each with two round-1 evolutions that add a third term
("... + c?"). Every CoT solution is two arithmetic steps and an answer line; in the second CoT
sample of every evolution the first step is planted wrong ("a + b = a + b + 1") and labelled so.
Evolution `sK.r1.b` is unverified (its majority is under the threshold).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from storage.datasets import DatasetRef, DatasetStore
from tasks.evolution.records import Instruction
from tasks.solutions.records import Answer, SftAnswer, Solution

N_SEEDS = 6


def _terms(k: int) -> tuple[int, int, int]:
    return 3 + k, 5 + 2 * k, 2 + k


def cot_text(a: int, b: int, c: int | None, wrong: bool = False) -> str:
    first = a + b + (1 if wrong else 0)
    lines = [f"Step 1: {a} + {b} = {first}."]
    total = first
    if c is not None:
        total = first + c
        lines.append(f"Step 2: {first} + {c} = {total}.")
    lines.append(f"The answer is: {total}")
    return "\n".join(lines)


def frames() -> dict[str, pl.DataFrame]:
    seeds, instructions, sft, solutions, answers = [], [], [], [], []
    pairs, steps, rewards = [], [], []
    for k in range(N_SEEDS):
        a, b, c = _terms(k)
        sid = f"s{k}"
        question = f"What is {a} + {b}?"
        seeds.append(
            {"id": sid, "source": "sample", "question": question, "answer": str(a + b),
             "solution": f"{a} + {b} = {a + b}\n#### {a + b}", "subject": None, "level": None}
        )  # fmt: skip
        instructions.append(
            {"id": sid, "parent_id": None, "root_id": sid, "round": 0, "direction": "seed",
             "op": "seed", "template_version": "", "model": "sample", "text": question}
        )  # fmt: skip
        sft.append(
            {"seed_id": sid, "solution": None if k == 5 else cot_text(a, b, None),
             "predicted": str(a + b), "correct": k != 5, "tries": 1,
             "reason": "wrong_answer" if k == 5 else "correct", "model": "m",
             "template_version": "t"}
        )  # fmt: skip
        members = [(sid, 0, None)] + [(f"{sid}.r1.{x}", 1, c + i) for i, x in enumerate("ab")]
        for iid, rnd, extra in members:
            if rnd:
                instructions.append(
                    {"id": iid, "parent_id": sid, "root_id": sid, "round": 1,
                     "direction": "upward", "op": "add_constraints", "template_version": "v",
                     "model": "m", "text": f"What is {a} + {b} + {extra}?"}
                )  # fmt: skip
            total = a + b + (extra or 0)
            verified = not iid.endswith(".b")
            for s in range(3):
                wrong = rnd == 1 and s == 1
                kind = "pot" if s == 2 else "cot"
                text = cot_text(a, b, extra, wrong) if kind == "cot" else "```python\nprint(1)\n```"
                program = None if kind == "cot" else f"print({a} + {b} + {extra or 0})"
                solutions.append(
                    {"id": f"{iid}:{s}", "instruction_id": iid, "kind": kind, "sample": s,
                     "text": text, "program": program,
                     "program_stdout": None if kind == "cot" else f"{total}\n",
                     "program_error": None,
                     "extracted_answer": str(total + (1 if wrong else 0)),
                     "finish_reason": "stop", "model": "m", "template_version": "t",
                     "verdict": not wrong}
                )  # fmt: skip
                if kind == "cot":
                    lines = text.split("\n")
                    for j, line in enumerate(lines):
                        bad = wrong  # the planted step and every later one
                        steps.append(
                            {"solution_id": f"{iid}:{s}", "instruction_id": iid,
                             "step_index": j, "step_text": line, "judge": not bad,
                             "mc_soft": 0.0 if bad else 1.0, "mc_hard": not bad,
                             "consensus": None if (k == 4 and rnd == 0) else not bad,
                             "is_pot": False}
                        )  # fmt: skip
                rewards.append(
                    {"instruction_id": iid, "solution_id": f"{iid}:{s}",
                     "r_i": 0.5 + 0.05 * k, "r_i_sibling": 0.5, "r_a": 0.0 if wrong else 1.0,
                     "r": 0.0 if wrong else 0.5 + 0.05 * k}
                )  # fmt: skip
            answers.append(
                {"instruction_id": iid, "answer": str(total), "agreement": 2 / 3 if verified else 1 / 3,
                 "n_samples": 3, "n_answered": 3, "group_sizes": [2, 1], "cot_answer": str(total),
                 "pot_answer": str(total), "cot_pot_agreement": True,
                 "difficulty": 1 / 3, "verified": verified, "reference_match": True if rnd == 0 else None,
                 "round": rnd}
            )  # fmt: skip
        pairs.append(
            {"id": f"{sid}:pair", "parent_id": sid, "round": 1, "prompt": question,
             "chosen": f"What is {a} + {b} + {c}?", "rejected": f"What is {a} plus?",
             "chosen_id": f"{sid}.r1.a", "rejected_id": f"{sid}.r1.b", "margin": 1.0,
             "consistent": k != 3}
        )  # fmt: skip
    return {
        "seeds": pl.DataFrame(seeds, schema_overrides={"subject": pl.String, "level": pl.Int64}),
        "instructions": Instruction.frame(instructions),
        "sft_answers": SftAnswer.frame(sft),
        "solutions": Solution.frame(solutions),
        "answers": Answer.frame(answers),
        "irm_pairs": pl.DataFrame(pairs),
        "step_labels": pl.DataFrame(steps),
        "rewards": pl.DataFrame(rewards),
    }


def write_all(store: DatasetStore) -> dict[str, DatasetRef]:
    """Every synthetic frame as a dataset version; their refs by name."""
    refs = {}
    for name, frame in frames().items():
        refs[name] = store.write(name, frame, stage="synthetic", code_version="t", params={}).ref
    return refs


def refs_kwargs(refs: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: refs[n] for n in names}
