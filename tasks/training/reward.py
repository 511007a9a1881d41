"""r = rI · rA from the trained reward models, as ONE trl reward function (WizardMath's PPO
reward, here for GRPO/RLOO).

`InstructionAnswerReward` is called as GRPOTrainer and RLOOTrainer 1.16 call a reward function:
`reward(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=...,
log_metric=..., **dataset_columns) -> list[float | None]`. trl sums its reward functions, so the
product must be one function. The columns of `rl_prompts` arrive as keyword lists, one value per
completion: `instruction`, `parent`, `label`, `r_i`.

- **rI** (instruction reward) from the trained IRM: sigmoid of its logit on the instruction and
  its parent (`InstructionReward.scores`), computed once per distinct prompt (prompts repeat
  `num_generations` times per batch and again every epoch). Without an IRM: the `r_i` column (the
  judge's rI from the `rewards` dataset), else the judge-based reward's `instruction_rewards`,
  else `r_i_default` when one is configured (1.0: that prompt is not weighted), else None.
- **rA** (answer reward) from the trained PRM: the completion is split into steps
  (`tasks.rewards.steps.segment_steps`) and rA is the minimum over its steps of P(step correct)
  (`PrmScorer.step_probabilities`); an empty completion scores 0. A completion with a step the
  PRM could not score (cut off by its max length) could not be judged: rA is None, never the
  minimum over the steps that were scored (the step left out may be the wrong one). Each is
  counted: `rA_cut` in the trainer's log (completions per batch), `unscored` on the reward
  (the run's total, by reason). Without a PRM: the judge-based reward's `answer_rewards`
  (`tasks.rewards.functions.JudgeReward`).
- **gate** (optional): the completion's final answer is checked against `label`
  (`check_completions`); a wrong answer scores 0, an answer that could not be judged None.

None means "could not judge" (trl turns it into NaN and leaves it out of the group statistics),
never 0. rI and rA are logged separately through trl's `log_metric` (batch means: `rI`, `rA`,
`correct`) and `log_extra` (per completion, in the completions table); the last batch is also on
`reward.last`.

With GRPO's default `scale_rewards="group"` a per-prompt factor such as rI divides out of the
advantages; the RL stage uses `scale_rewards="batch"` so that rI weighs prompts against each other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from tasks.rewards.functions import finite_number, instruction_text, message_text

# Why rA is None for a completion the PRM was asked about.
CUT = "steps_past_max_length"
NO_STEP = "no_visible_step"


def default_segmenter() -> Callable[[str], list[str]]:
    from tasks.rewards.steps import segment_steps

    return segment_steps


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


class InstructionAnswerReward:
    """r = rI · rA per completion from the trained IRM and PRM (see the module docstring)."""

    __name__ = "r_instruction_answer"

    def __init__(
        self,
        irm: Any | None = None,
        prm: Any | None = None,
        judge: Any | None = None,
        segmenter: Callable[[str], list[str]] | None = None,
        gate: bool = False,
        verifier: Any | None = None,
        r_i_default: float | None = None,
    ):
        if prm is None and judge is None:
            raise ValueError("rA needs a trained PRM or a judge-based reward to fall back on")
        self.irm = irm
        self.prm = prm
        self.judge = judge
        self.segmenter = segmenter
        self.gate = gate
        self.verifier = verifier
        self.r_i_default = r_i_default
        self._r_i: dict[tuple[str, str | None], float | None] = {}
        self.last: dict[str, list[Any]] = {
            "r_i": [],
            "r_a": [],
            "r_a_unscored": [],
            "correct": [],
            "r": [],
        }
        self.unscored: Counter[str] = Counter()

    # -- rI -------------------------------------------------------------------------------------
    def instruction_rewards(
        self,
        instructions: Sequence[str],
        parents: Sequence[str | None],
        given: Sequence[Any] | None = None,
    ) -> list[float | None]:
        """rI per row: the IRM once per distinct (instruction, parent), else the given column,
        else the judge."""
        out: list[float | None] = [None] * len(instructions)
        if self.irm is not None:
            keys = list(zip(instructions, parents, strict=True))
            todo = list(dict.fromkeys(k for k in keys if k not in self._r_i))
            if todo:
                scores = self.irm.scores([k[0] for k in todo], [k[1] for k in todo])
                self._r_i.update(zip(todo, scores, strict=True))
            return [self._r_i[k] for k in keys]
        missing = []
        for i in range(len(instructions)):
            value = finite_number(given[i]) if given is not None else None
            if value is not None:
                out[i] = value
            else:
                missing.append(i)
        if missing and self.judge is not None:
            judged = self.judge.instruction_rewards([instructions[i] for i in missing])
            for i, value in zip(missing, judged, strict=True):
                out[i] = value
        if self.r_i_default is not None:
            out = [self.r_i_default if v is None else v for v in out]
        return out

    # -- rA -------------------------------------------------------------------------------------
    def answer_rewards(
        self, prompts: Sequence[str], texts: Sequence[str], instructions: Sequence[str]
    ) -> list[float | None]:
        """rA per completion: min over its steps of P(correct) from the PRM, else the judge;
        None when a step could not be scored (`last["r_a_unscored"]` says why)."""
        unscored: list[str | None] = [None] * len(texts)
        self.last["r_a_unscored"] = unscored
        if self.prm is None:
            return list(self.judge.answer_rewards(list(instructions), list(texts)))
        segment = self.segmenter or default_segmenter()
        steps = [segment(t) if t and t.strip() else [] for t in texts]
        out: list[float | None] = [0.0] * len(texts)  # no step: an empty completion
        todo = [i for i, s in enumerate(steps) if s]
        if todo:
            probs = self.prm.step_probabilities(
                [prompts[i] for i in todo], [steps[i] for i in todo]
            )
            for i, ps in zip(todo, probs, strict=True):
                # A step with no visible character has no token to be read at (no score, not a
                # step); any other step without a score was past the PRM's max length.
                cut = any(p is None and step.strip() for p, step in zip(ps, steps[i], strict=True))
                known = [p for p in ps if p is not None]
                if cut or not known:
                    out[i] = None
                    unscored[i] = CUT if cut else NO_STEP
                    self.unscored[unscored[i]] += 1
                else:
                    out[i] = min(known)
        return out

    def correctness(
        self, texts: Sequence[str], labels: Sequence[str | None] | None
    ) -> list[bool | None]:
        from tasks.solutions.answers import check_completions

        if labels is None:
            return [None] * len(texts)
        return check_completions(list(texts), list(labels), self.verifier)

    # -- trl's call -----------------------------------------------------------------------------
    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts vs {len(completions)} completions")
        prompt_texts = [message_text(p) for p in prompts]
        texts = [message_text(c) for c in completions]
        instructions = kwargs.get("instruction") or [instruction_text(p) for p in prompt_texts]
        parents = kwargs.get("parent") or [None] * len(prompts)
        r_i = self.instruction_rewards(instructions, parents, kwargs.get("r_i"))
        r_a = self.answer_rewards(prompt_texts, texts, instructions)
        r = [
            a * b if a is not None and b is not None else None
            for a, b in zip(r_i, r_a, strict=True)
        ]
        correct: list[bool | None] = [None] * len(texts)
        if self.gate:
            correct = self.correctness(texts, kwargs.get("label"))
            r = [None if c is None else (v if c else 0.0) for v, c in zip(r, correct, strict=True)]
        self.last = {
            "r_i": r_i,
            "r_a": r_a,
            "r_a_unscored": self.last["r_a_unscored"],
            "correct": correct,
            "r": r,
        }
        self._log(kwargs.get("log_metric"), kwargs.get("log_extra"))
        return r

    def _log(self, log_metric: Callable | None, log_extra: Callable | None) -> None:
        if log_metric is not None:
            for name, key in (("rI", "r_i"), ("rA", "r_a")):
                mean = _mean(self.last[key])
                if mean is not None:
                    log_metric(name, mean)
            if self.prm is not None:
                log_metric("rA_cut", float(self.last["r_a_unscored"].count(CUT)))
            if self.gate:
                judged = [float(c) for c in self.last["correct"] if c is not None]
                if judged:
                    log_metric("correct", sum(judged) / len(judged))
        if log_extra is not None:
            log_extra("rI", list(self.last["r_i"]))
            log_extra("rA", list(self.last["r_a"]))
