"""The evaluation flow: benchmark items → contamination guard → requests → answers → scores.

Evaluates any models (the embedded base, local folders, checkpoints from the `models` view, vLLM
or OpenAI-compatible models) on GSM8K test, MATH500 and the out-of-domain sets, in cot, pot,
hybrid and maj@k modes. Every request goes through the request cache, so a rerun (or a larger
`limit`, whose items include the smaller one's) only pays for what is new.

    evolforge eval --model base --model sft_model --benchmarks gsm8k,math500 \\
        --modes cot,hybrid --limit 200

Outputs: `eval_items`, `eval_contamination`, `eval_requests`, `eval_results` (one row per model x
benchmark x mode x item), `eval_scores` (accuracy, Wilson 95% interval, fallback rate, overlap),
`eval_chart` (PNG), and Prefect artifacts with the comparison table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from flows.overrides import load_profile
from flows.reports.evaluation import publish_evaluation_report
from flows.state import EvaluationState, FlowState
from infra.engines import EngineConfig, engine_scope
from infra.sandbox import SandboxSettings
from storage.locks import run_lock
from storage.settings import home, shard_workers
from tasks.benchmarks import REGISTRY, BenchmarkSource, benchmark_source
from tasks.evaluation.evaluate import (
    DecodingParams,
    evaluate_batch,
    mode_label,
    parse_mode,
    plan_evaluation,
)
from tasks.evaluation.guard import GuardParams, guard_contamination
from tasks.evaluation.items import load_eval_items
from tasks.evaluation.models import ModelFolders, resolve_models
from tasks.evaluation.scores import draw_evaluation_chart, score_evaluation
from tasks.executors import ExecutorSettings, executor_scope

RUNNER = ThreadPoolTaskRunner(max_workers=shard_workers())


class EvaluationParams(BaseModel):
    """Which models, on which benchmarks, in which decoding modes."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="evaluate at the end of a factory run")
    models: list[str] = Field(
        default_factory=lambda: ["base"],
        min_length=1,
        description="base | a local HF folder | a checkpoint (sft_model, sft_model@<prefix>) | "
        "a hub id or served name (vllm, openai); label=spec names it in tables",
    )
    benchmarks: list[str] = Field(
        default_factory=lambda: ["gsm8k", "math500"],
        min_length=1,
        description=f"benchmark names: {', '.join(REGISTRY)} or a name from `sources`",
    )
    sources: list[BenchmarkSource] = Field(
        default_factory=list,
        description="where a benchmark is read from when not the shared copy: a local file or a "
        "hub data set (by name; a registry format maps its records)",
    )
    modes: list[str] = Field(
        default_factory=lambda: ["cot"],
        min_length=1,
        description="cot, pot, hybrid, maj@k (k below) or maj@<n>",
    )
    limit: int | None = Field(
        None, ge=1, description="a seeded subset of this many items per benchmark"
    )
    seed: int = Field(0, description="seed of the subset")
    k: int = Field(8, ge=1, le=64, description="samples of maj@k")
    prompt_format: Literal["auto", "alpaca", "chat"] = Field(
        "auto",
        description="auto and alpaca: WizardMath's Alpaca prompt, sent raw, for every model (the "
        "base, the SFT and RL checkpoints alike, as WizardMath evaluates them; a base without a "
        "chat template works); chat: each model's chat template, and the Alpaca prompt for a "
        "local model whose tokenizer has none (its rows say alpaca)",
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="the engine every model runs on (its `model` is the base)",
    )
    decoding: DecodingParams = Field(
        default_factory=DecodingParams,
        description="token budgets of cot and pot (greedy), sampling of maj@k",
    )
    sandbox: SandboxSettings = Field(
        default_factory=SandboxSettings, description="limits of the sandbox PoT programs run in"
    )
    contamination: GuardParams = Field(
        default_factory=GuardParams,
        description="the decontamination n-gram rule applied to items vs each model's training sets",
    )
    skip_missing_models: bool = Field(
        False, description="leave out model specs that name nothing instead of failing"
    )

    @field_validator("modes")
    @classmethod
    def _modes(cls, modes: list[str]) -> list[str]:
        for mode in modes:
            parse_mode(mode, 1)
        return modes

    @model_validator(mode="after")
    def _check(self) -> EvaluationParams:
        labels = self.mode_labels()
        if len(set(labels)) != len(labels):
            raise ValueError(f"modes repeat: {', '.join(labels)}")
        named = {s.name for s in self.sources}
        unknown = [b for b in self.benchmarks if b not in REGISTRY and b not in named]
        if unknown:
            raise ValueError(
                f"unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(REGISTRY)}, "
                "or name a source in `sources`)"
            )
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"benchmarks repeat: {', '.join(self.benchmarks)}")
        return self

    def benchmark_sources(self) -> list[BenchmarkSource]:
        """The sources of `benchmarks`, in order: a `sources` entry by that name, else the
        shared copy of the registry set."""
        named = {s.name: s for s in self.sources}
        return [named.get(name) or benchmark_source(name) for name in self.benchmarks]

    def mode_labels(self) -> list[str]:
        return [mode_label(m, self.k) for m in self.modes]


@flow(name="evaluation", log_prints=True, validate_parameters=True, task_runner=RUNNER)
def evaluation(
    params: EvaluationParams = EvaluationParams(), executor: ExecutorSettings = ExecutorSettings()
) -> EvaluationState:
    """Evaluate models on math benchmarks (greedy CoT, PoT, hybrid PoT→CoT, maj@k)."""
    with run_lock(home(), "evaluation"), engine_scope(), executor_scope(executor):
        return _evaluate(params)


def pinned(params: EvaluationParams, trained: FlowState | None) -> EvaluationParams:
    """The parameters with each model named only by its name (`sft_model`) pinned to the version
    the run just trained (`sft_model@<version>`), so a factory run evaluates its own models."""
    if trained is None:
        return params
    refs = trained.refs()
    models = []
    for spec in params.models:
        label, sep, target = spec.rpartition("=")
        name = target.strip()
        if name in refs and "@" not in name:
            target = refs[name]
        models.append(f"{label}{sep}{target}")
    return params.model_copy(update={"models": models})


def _evaluate(params: EvaluationParams) -> EvaluationState:
    items = load_eval_items(
        benchmarks=params.benchmark_sources(), limit=params.limit, seed=params.seed
    )
    state = EvaluationState().updated(items)
    models = resolve_models(
        specs=params.models,
        engine=params.engine,
        prompt_format=params.prompt_format,
        skip_missing=params.skip_missing_models,
    )
    state = state.updated(
        guard_contamination(eval_items=state.eval_items, models=models, params=params.contamination)
    )
    state = state.updated(
        plan_evaluation(eval_items=state.eval_items, models=models, modes=params.modes, k=params.k)
    )
    state = state.updated(
        evaluate_batch(
            eval_requests=state.eval_requests,
            engine=params.engine,
            decoding=params.decoding,
            sandbox=params.sandbox,
            folders=ModelFolders.of(models, params.engine),
        )
    )
    state = state.updated(
        score_evaluation(
            eval_results=state.eval_results, eval_contamination=state.eval_contamination
        )
    )
    state = state.updated(draw_evaluation_chart(eval_scores=state.eval_scores))
    publish_evaluation_report(state=state)
    return state


def eval_params_from_cli(
    models: list[str],
    benchmarks: list[str],
    modes: list[str],
    limit: int | None,
    seed: int | None = None,
    k: int | None = None,
    prompt_format: str | None = None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
) -> EvaluationParams:
    """`evolforge eval` options → `EvaluationParams`.

    The `evaluation:` section of `config` (a run profile, `extends:` followed as for `run`) is
    the base; the command's options
    replace its fields (empty lists and None leave them); `--set key=value` overrides any field
    of the section by its dotted path (`--set decoding.cot_max_tokens=256`).
    """
    given: dict[str, Any] = {
        "models": models,
        "benchmarks": benchmarks,
        "modes": modes,
        "limit": limit,
        "seed": seed,
        "k": k,
        "prompt_format": prompt_format,
    }
    return load_profile(
        config,
        overrides or [],
        EvaluationParams,
        section="evaluation",
        given={key: value for key, value in given.items() if value not in (None, [])},
    )


if __name__ == "__main__":
    evaluation()
