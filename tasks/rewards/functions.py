"""Reward functions for trl: r = rI · rA as ONE function, backed by an LLM judge.

trl's GRPOTrainer sums its reward functions (weighted), so WizardMath's product r = rI · rA must
be a single function. `JudgeReward` is called exactly as GRPOTrainer 1.16 calls a reward
function:

    reward = JudgeReward(EngineConfig(kind="vllm", model="Qwen/Qwen2.5-7B-Instruct"))
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=dataset, ...)
    # per batch: reward(prompts=..., completions=..., completion_ids=..., trainer_state=...,
    #                   log_extra=..., log_metric=..., **dataset_columns) -> list[float | None]

- `prompts` / `completions` are strings, or conversations (lists of `{"role", "content"}` dicts;
  a completion is `[{"role": "assistant", "content": ...}]`). The instruction is the last user
  message (WizardMath's Alpaca wrapper "### Instruction: ... ### Response:" is peeled off).
- **rI**: a dataset column `r_i` (e.g. from the `rewards` dataset) is used where it holds a
  number; otherwise the judge grades the instruction on definition, precision and integrity
  (template `judge_instruction.txt`, JSON schema) and rI = (mean - 1) / 9, the same scale as the
  `rewards` dataset's `r_i`. Each distinct instruction is judged once per instance.
- **rA**: the completion is split into steps (`tasks.rewards.steps`) and the step judge names
  the first incorrect step (`tasks.rewards.step_judge`); the step scores (1 before it, 0 at it)
  are aggregated by min or product (`tasks.rewards.scores.aggregate_steps`): 1 when no step is
  wrong, else 0. An empty completion answers nothing and scores 0.
- **r = rI · rA**, None where either could not be judged (trl turns None into NaN and ignores
  it in the group statistics): never 0 for "could not judge".

Logging: trl 1.16 passes `log_metric(name, value)` and `log_extra(column, values)` to reward
functions; `JudgeReward` logs the batch means of rI and rA and the share of None rewards as
metrics (`judge_reward/r_i`, `judge_reward/r_a`, `judge_reward/none`), and the per-sample rI and
rA as columns of the completions table. The last call's values are also on `reward.last`
(`{"r_i": [...], "r_a": [...], "r": [...]}`) for callers outside trl.

A reward backed by the trained IRM/PRM has the same call signature; this one is its fallback.
Note for GRPO: its advantages are normalised per prompt group, so a per-prompt factor such as rI
scales out when `scale_rewards="group"`; rI shapes the reward under `scale_rewards="batch"` or
`"none"`, or in PPO as in WizardMath.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from infra.engines import EngineConfig
from infra.engines.base import ChatRequest, Engine
from tasks.rewards.judging import JudgeError, json_object, reply_text
from tasks.rewards.rankings import CRITERIA, criterion_score
from tasks.rewards.scores import Aggregation, aggregate_steps
from tasks.rewards.step_judge import StepJudgeParams, judge_first_errors, judge_labels
from tasks.rewards.steps import segment_steps
from tasks.sampling import Sampling
from tasks.templates import load_template

INSTRUCTION_TEMPLATE = "judge_instruction"
_ALPACA = re.compile(r"###\s*Instruction:\s*(.*?)\s*(?:###\s*Response:.*)?\Z", re.DOTALL)


InstructionJudgeSampling = Sampling.defaults(
    "InstructionJudgeSampling", "Sampling of the rI judge (greedy).", max_tokens=256
)


class JudgeRewardParams(BaseModel):
    """The judge-backed r = rI · rA reward."""

    model_config = ConfigDict(extra="forbid")

    aggregation: Aggregation = Field("min", description="min or product of the step scores")
    use_dataset_r_i: bool = Field(True, description="take rI from an `r_i` column when present")
    reason_max_chars: int = Field(120, ge=8, le=2000)
    instruction_sampling: InstructionJudgeSampling = Field(
        default_factory=InstructionJudgeSampling,
        description="sampling of the rI judge's JSON reply",
    )
    steps: StepJudgeParams = Field(default_factory=StepJudgeParams)


def message_text(value: Any, role: str | None = None) -> str:
    """The text of a prompt or completion: a string, or the content of a conversation's last
    message with `role` (any role when None)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _content(value.get("content"))
    messages = [m for m in value if isinstance(m, dict) and (role is None or m.get("role") == role)]
    if not messages:
        return ""
    return _content(messages[-1].get("content"))


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}]
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return "" if content is None else str(content)


def instruction_text(prompt: Any) -> str:
    """The instruction of a prompt: the last user message, without the Alpaca wrapper."""
    text = message_text(prompt, None if isinstance(prompt, str) else "user")
    m = _ALPACA.search(text)
    return (m.group(1) if m else text).strip()


def completion_text(completion: Any) -> str:
    """A completion's text: a string, or the assistant messages' contents joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(
            _content(m.get("content"))
            for m in completion
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
        )
    return message_text(completion)


def finite_number(value: Any) -> float | None:
    """`value` as a finite float, or None (booleans, text and NaN/inf are not rewards)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class JudgeReward:
    """r = rI · rA per completion, rI and rA from an LLM judge (see the module docstring)."""

    __name__ = "judge_reward"

    def __init__(
        self,
        judge: EngineConfig | None = None,
        params: JudgeRewardParams | None = None,
        engine: Engine | None = None,
    ):
        if judge is None and engine is None:
            raise ValueError("JudgeReward needs a judge EngineConfig or an engine")
        self.judge = judge
        self.params = params or JudgeRewardParams()
        self._engine = engine
        self._r_i: dict[str, float | None] = {}
        self.last: dict[str, list[float | None]] = {"r_i": [], "r_a": [], "r": []}

    def __getstate__(self) -> dict[str, Any]:  # picklable: the engine is reopened on demand
        state = dict(self.__dict__)
        if self.judge is not None:
            state["_engine"] = None
        return state

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from infra.engines import open_engine

            assert self.judge is not None
            self._engine = open_engine(self.judge, self.__name__)
        return self._engine

    # -- rI -----------------------------------------------------------------------------------
    def instruction_request(self, instruction: str) -> ChatRequest:
        template = load_template(INSTRUCTION_TEMPLATE)
        schema = {
            "type": "object",
            "properties": {
                **{c: {"type": "integer", "minimum": 1, "maximum": 10} for c in CRITERIA},
                "reason": {"type": "string", "maxLength": self.params.reason_max_chars},
            },
            "required": [*CRITERIA, "reason"],
            "additionalProperties": False,
        }
        return ChatRequest(
            messages=tuple(template.messages(problem=instruction)),
            sampling=self.params.instruction_sampling.engine_params(),
            json_schema=schema,
            template_version=template.version,
        )

    def instruction_rewards(self, instructions: Sequence[str]) -> list[float | None]:
        """rI per instruction, each distinct one judged once per instance."""
        todo = sorted({i for i in instructions if i not in self._r_i})
        if todo:
            responses = self.engine.generate([self.instruction_request(i) for i in todo])
            for instruction, response in zip(todo, responses, strict=True):
                self._r_i[instruction] = _instruction_score(response)
        return [self._r_i[i] for i in instructions]

    # -- rA -----------------------------------------------------------------------------------
    def answer_rewards(
        self, instructions: Sequence[str], texts: Sequence[str]
    ) -> list[float | None]:
        steps = [segment_steps(t) for t in texts]
        todo = [i for i, s in enumerate(steps) if s]
        out: list[float | None] = [0.0] * len(texts)  # no steps: an empty completion
        judgments = judge_first_errors(
            [instructions[i] for i in todo],
            [steps[i] for i in todo],
            self.engine,
            self.params.steps,
        )
        for i, j in zip(todo, judgments, strict=True):
            labels = judge_labels(j["first_error"], len(steps[i]), j["judged"])
            scores = [None if x is None else float(x) for x in labels]
            out[i] = aggregate_steps(scores, self.params.aggregation)
        return out

    # -- trl's call ---------------------------------------------------------------------------
    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts vs {len(completions)} completions")
        instructions = [instruction_text(p) for p in prompts]
        texts = [completion_text(c) for c in completions]
        given = kwargs.get("r_i") if self.params.use_dataset_r_i else None
        r_i: list[float | None] = [None] * len(prompts)
        missing = []
        for i in range(len(prompts)):
            value = finite_number(given[i]) if given is not None else None
            if value is not None:
                r_i[i] = value
            else:
                missing.append(i)
        if missing:
            judged = self.instruction_rewards([instructions[i] for i in missing])
            for i, value in zip(missing, judged, strict=True):
                r_i[i] = value
        r_a = self.answer_rewards(instructions, texts)
        r = [
            a * b if a is not None and b is not None else None
            for a, b in zip(r_i, r_a, strict=True)
        ]
        self.last = {"r_i": r_i, "r_a": r_a, "r": r}
        self._log(kwargs.get("log_metric"), kwargs.get("log_extra"))
        return r

    def _log(self, log_metric: Callable | None, log_extra: Callable | None) -> None:
        if log_metric is not None:
            for name in ("r_i", "r_a"):
                known = [v for v in self.last[name] if v is not None]
                if known:
                    log_metric(f"{self.__name__}/{name}", sum(known) / len(known))
            n = len(self.last["r"])
            if n:
                log_metric(f"{self.__name__}/none", sum(v is None for v in self.last["r"]) / n)
        if log_extra is not None:
            log_extra("r_i", list(self.last["r_i"]))
            log_extra("r_a", list(self.last["r_a"]))


def _instruction_score(response: Any) -> float | None:
    try:
        obj = {str(k).strip().lower(): v for k, v in json_object(reply_text(response)).items()}
        scores = [criterion_score(obj.get(c), c) for c in CRITERIA]
    except JudgeError:
        return None
    return (sum(scores) / len(scores) - 1.0) / 9.0
