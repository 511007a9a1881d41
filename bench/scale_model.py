"""Toward internet scale, on paper: the paper profile's LLM work, storage and bottlenecks,
projected from what a finished demo home recorded.

Reads, from a data home where every flow ran (`--home`, default the user's data home):

- each LLM stage's counters in its manifests' `stats.engine` (requests, hits, misses, prompt and
  completion tokens, engine seconds), summed over the stage's versions (one per round for the
  round stages; the `_shard.*` copies and a multi-output stage's second output are not counted
  twice), and the demo's own sizes from the same manifests (seeds, parents per round,
  evolutions generated, instructions, sibling groups, judged solutions, eval requests) and the
  demo's parameters recorded there (k_cot/k_pot, samples per seed, siblings k, rollouts n,
  judges on or off, the step-label cap);
- the request cache (`cache/requests/seg-*.jsonl`): records, bytes and completions per stage;
- every version's parquet bytes and rows (`files[].bytes`, `rows`).

From them it derives per stage the requests and tokens per unit of work (per seed, per parent
and round, per instruction, ...), then projects them for `configs/paper.yaml`, read through the
project's profile loader (`flows.registry.load_params`), at 15k and 1M seeds (`--seeds`):
requests, prompt and completion tokens, GPU-hours and wall-clock hours on each of `--gpus`,
parquet storage, and where the single-writer catalog, the run lock and the request cache stop
scaling.

The model, stage by stage (a paper/demo ratio multiplies the demo's per-unit figure):

- sft_answers: per seed, x samples_per_seed (an upper bound: later tries go only to the seeds
  still unsolved);
- evolve: per parent and round (the pool keeps one parent per seed with one evolution each), x
  rounds, x evolutions_per_parent;
- eliminate: per generated evolution, x (1 + judges on) / (1 + judges on in the demo): each
  judge asks one more request per evolution the rules let through;
- solve: per instruction (instructions per seed = 1 + kept evolutions per seed and round x
  rounds, measured, or `--instructions-per-seed`), completions x (k_cot + k_pot); CoT and PoT
  are one request each with n samples, so the prompt side does not grow with k;
- evolve_siblings: per eligible parent, x share (capped by max_parents_per_round x rounds), x k;
  rank_siblings: two orders per group, the prompt x (k + 1) / (k_demo + 1) (the group's texts);
- judge_steps / rollout_steps: per judged solution, capped at max_solutions_per_round per round
  (rounds + 1 with the seeds): they stop growing with the seeds; rollouts x n;
- evaluate: per (item, model, mode), items from the benchmark registry's sizes (and `limit`).

Token lengths per sent request are the demo's (the 135M model, at the demo's small token caps):
the "at caps" figures instead let every completion run to the paper's max_tokens (an upper
bound). Training (four trainers, fixed step counts) is not in the figures.

Throughput (`--tokens-per-s-per-gpu`, default 2,500 generated tokens/s per GPU, and
`--prefill-tokens-per-s-per-gpu`, default 25,000 prompt tokens/s): an ASSUMPTION for a 7B/8B
bf16 model (Qwen2.5-7B-Instruct, the paper profile's engine) under vLLM on one H100 80GB with
large generation-heavy batches. No measured figure backs it: the project has no GPU measurement
of vLLM (bench/RESULTS.md has CPU figures only), and the stored copy of vLLM's v0.6.0
performance post (blog.vllm.ai/2024/09/05/perf-update.html, "Llama 8B on 1xH100, ShareGPT")
that a search found gives relative gains, not the absolute tokens/s. Replace both with a
measurement (`vllm bench throughput --model Qwen/Qwen2.5-7B-Instruct --input-len 600
--output-len 512` on the target GPU). GPU-seconds = completion tokens / decode rate + prompt
tokens / prefill rate; wall-clock = GPU-hours / N (ideal data parallelism: one engine per GPU,
no model loads, no CPU stages, no training).

    .venv/bin/python bench/scale_model.py [--home DIR] [--config configs/paper.yaml]
        [--seeds 15000 1000000] [--gpus 1 8 64 512] [--tokens-per-s-per-gpu 2500]
        [--prefill-tokens-per-s-per-gpu 25000] [--instructions-per-seed X]

The home is only read. A home without the needed stats stops with one line naming the missing
dataset or field (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.params import FactoryParams
from flows.registry import load_params
from storage.datasets import DatasetStore, Manifest
from storage.errors import UserError
from storage.request_cache import _Location
from storage.settings import home as default_home
from tasks.benchmarks import REGISTRY

DEFAULT_TPS = 2500.0
DEFAULT_PREFILL_TPS = 25000.0
ROOT = Path(__file__).resolve().parent.parent


class ScaleError(UserError):
    """The home lacks a dataset or a field the model needs."""


# Each LLM stage: the dataset its counters are read from and the unit its work is counted in.
LLM_STAGES = [
    ("sft_answers", "sft_answers", "seed"),
    ("evolve", "evolutions", "parent-round"),
    ("eliminate", "elimination", "evolution"),
    ("solve", "solutions", "instruction"),
    ("evolve_siblings", "siblings", "sibling parent"),
    ("rank_siblings", "instruction_rankings", "group"),
    ("judge_steps", "step_judgments", "judged solution"),
    ("rollout_steps", "step_rollouts", "judged solution"),
    ("evaluate", "eval_results", "eval request"),
]


# The sharded stages' modules: their declarations give each one's shard size and outputs.
SHARDED_MODULES = [
    "tasks.solutions.sft",
    "tasks.evolution.evolve",
    "tasks.evolution.eliminate",
    "tasks.solutions.solve",
    "tasks.rewards.step_judge",
    "tasks.rewards.monte_carlo",
    "tasks.evaluation.evaluate",
]


def shard_declarations() -> dict[str, tuple[int, int]]:
    """Stage name -> (rows per shard, outputs) for every sharded stage."""
    out = {}
    for module_name in SHARDED_MODULES:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            shard = getattr(value, "shard", None)
            if shard is not None and hasattr(value, "outputs") and hasattr(value, "name"):
                out[value.name] = (shard.rows, len(value.outputs))
    return out


# -- reading the demo home ------------------------------------------------------------------


@dataclass
class Counters:
    requests: float = 0.0
    hits: float = 0.0
    misses: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    engine_seconds: float = 0.0

    def add(self, engine: dict[str, Any], where: str) -> None:
        for name in ("requests", "hits", "misses", "prompt_tokens", "completion_tokens"):
            if name not in engine:
                raise ScaleError(f"{where}: stats.engine has no field {name!r}")
            setattr(self, name, getattr(self, name) + float(engine[name]))
        self.engine_seconds += float(engine.get("engine_seconds", 0.0))


@dataclass
class Demo:
    """What the demo home recorded."""

    counters: dict[str, Counters]
    units: dict[str, float]  # demo units per stage
    sizes: dict[str, float]  # seeds, rounds, instructions, eligible parents, ...
    params: dict[str, dict[str, Any]]  # recorded parameters per dataset (newest version)
    datasets: dict[str, dict[str, float]]  # name -> rows, bytes, versions (incl. _shard.*)
    cache: dict[str, dict[str, float]]  # stage -> records, bytes, completions
    stage_versions: dict[str, int] = field(default_factory=dict)  # versions per LLM stage
    cache_segments: int = 0
    versions: int = 0  # committed non-shard versions
    shard_versions: int = 0
    files: int = 0


def _versions(store: DatasetStore, name: str) -> list[Manifest]:
    found = store.versions(name)
    if not found:
        raise ScaleError(f"the home has no dataset {name!r} (run every flow of the demo first)")
    return found


def _stat(manifest: Manifest, key: str) -> float:
    if key not in manifest.stats:
        raise ScaleError(f"{manifest.name}@{manifest.version}: stats has no field {key!r}")
    return float(manifest.stats[key])


def _param(manifest: Manifest, key: str) -> Any:
    params = manifest.params.get("params", manifest.params)
    if key not in params:
        raise ScaleError(f"{manifest.name}@{manifest.version}: params has no field {key!r}")
    return params[key]


def read_demo(home: Path) -> Demo:
    home = Path(home)
    if not (home / "datasets").is_dir():
        raise ScaleError(f"not a data home (no datasets/ folder): {home}")
    store = DatasetStore(home)
    counters: dict[str, Counters] = {}
    stage_versions: dict[str, int] = {}
    for stage, dataset, _unit in LLM_STAGES:
        total = Counters()
        stage_versions[stage] = len(_versions(store, dataset))
        for manifest in _versions(store, dataset):
            if "engine" not in manifest.stats:
                raise ScaleError(f"{dataset}@{manifest.version}: stats has no field 'engine'")
            total.add(manifest.stats["engine"], f"{dataset}@{manifest.version}")
        counters[stage] = total

    def latest(name: str) -> Manifest:
        _versions(store, name)
        return store.latest(name)

    evolutions = _versions(store, "evolutions")
    seeds = float(latest("seeds").rows)
    rounds = float(len(evolutions))
    siblings = latest("siblings")
    rankings = latest("instruction_rankings")
    judged = latest("step_judgments")
    rollouts = latest("step_rollouts")
    evals = latest("eval_results")
    sizes = {
        "seeds": seeds,
        "rounds": rounds,
        "instructions": float(latest("instructions").rows),
        "parents": sum(_stat(m, "parents") for m in evolutions),
        "generated": sum(_stat(m, "generated") for m in _versions(store, "elimination")),
        "eligible_parents": _stat(siblings, "eligible_parents"),
        "sibling_parents": _stat(siblings, "parents"),
        "groups": _stat(rankings, "groups"),
        "judged": _stat(judged, "solutions"),
        "rolled": _stat(rollouts, "solutions"),
        "eval_requests": _stat(evals, "requests"),
        "solve_instructions": _stat(latest("solutions"), "instructions"),
    }
    units = {
        "sft_answers": seeds,
        "evolve": sizes["parents"],
        "eliminate": sizes["generated"],
        "solve": sizes["solve_instructions"],
        "evolve_siblings": sizes["sibling_parents"],
        "rank_siblings": sizes["groups"],
        "judge_steps": sizes["judged"],
        "rollout_steps": sizes["rolled"],
        "evaluate": sizes["eval_requests"],
    }
    for stage, value in units.items():
        if value <= 0:
            raise ScaleError(f"the demo home did no work in stage {stage!r} (0 units): rerun it")
    elim = latest("elimination")
    params = {
        "sft": {"samples_per_seed": _param(latest("sft_answers"), "samples_per_seed")},
        "evolution": {"evolutions_per_parent": _param(evolutions[-1], "evolutions_per_parent")},
        "elimination": {
            "judges": int(bool(_param(elim, "equal_judge")))
            + int(bool(_param(elim, "solvable_judge")))
        },
        "solutions": {
            "k": _param(latest("solutions"), "k_cot") + _param(latest("solutions"), "k_pot")
        },
        "siblings": {"k": _param(siblings, "k")},
        "monte_carlo": {"n": _param(rollouts, "n")},
    }
    datasets: dict[str, dict[str, float]] = {}
    n_versions = n_shards = n_files = 0
    for name in store.names(internal=True):
        for manifest in store.versions(name):
            entry = datasets.setdefault(name, {"rows": 0.0, "bytes": 0.0, "versions": 0.0})
            entry["versions"] += 1
            n_files += len(manifest.files) + 1
            if name.startswith("_shard."):
                n_shards += 1
            else:
                n_versions += 1
            if manifest.is_dataset:
                entry["rows"] += manifest.rows
                entry["bytes"] += sum(float(f.get("bytes", 0)) for f in manifest.files)
    cache, segments = read_cache(home / "cache" / "requests")
    return Demo(
        counters,
        units,
        sizes,
        params,
        datasets,
        cache,
        stage_versions,
        segments,
        n_versions,
        n_shards,
        n_files,
    )


def read_cache(root: Path) -> tuple[dict[str, dict[str, float]], int]:
    """Records, bytes and completions per stage in the request cache's segments."""
    out: dict[str, dict[str, float]] = {}
    segments = sorted(root.glob("seg-*.jsonl")) if root.is_dir() else []
    for segment in segments:
        for line in segment.read_bytes().splitlines(keepends=True):
            try:
                record = json.loads(line)
                stage = record["stage"]
                completions = len(record["response"]["completions"])
            except (ValueError, KeyError, TypeError):
                continue
            entry = out.setdefault(stage, {"records": 0.0, "bytes": 0.0, "completions": 0.0})
            entry["records"] += 1
            entry["bytes"] += len(line)
            entry["completions"] += completions
    return out, len(segments)


# -- the paper's sizes ----------------------------------------------------------------------


def benchmark_items(name: str, limit: int | None) -> int:
    """A registry benchmark's size, from its description ("GSM8K test (1,319 ...)")."""
    fmt = REGISTRY.get(name)
    match = re.search(r"\((\d[\d,]*)", fmt.description) if fmt else None
    if match is None:
        raise ScaleError(f"benchmark {name!r}: no size in the registry")
    size = int(match.group(1).replace(",", ""))
    return min(size, limit) if limit is not None else size


@dataclass
class Paper:
    rounds: int
    samples_per_seed: int
    evolutions_per_parent: int
    judges: int
    k: int
    k_cot: int
    k_pot: int
    sibling_k: int
    share: float
    max_parents_per_round: int | None
    max_solutions_per_round: int
    mc_n: int
    eval_requests: int
    batch_size: int
    caps: dict[str, float] = field(default_factory=dict)


def paper_sizes(params: FactoryParams) -> Paper:
    sol, rew, ev = params.solutions, params.rewards, params.evaluation
    benchmarks = [b if isinstance(b, str) else b.name for b in ev.benchmarks]
    items = sum(benchmark_items(b, ev.limit) for b in benchmarks)
    k = sol.k_cot + sol.k_pot
    caps = {
        "sft_answers": params.sft.sampling.max_tokens,
        "evolve": params.evolution.sampling.max_tokens,
        "eliminate": params.elimination.probe_sampling.max_tokens,
        "solve": (sol.k_cot * sol.sampling.max_tokens + sol.k_pot * sol.pot_max_tokens) / k,
        "evolve_siblings": rew.siblings.sampling.max_tokens,
        "rank_siblings": rew.ranking.sampling.max_tokens,
        "judge_steps": rew.step_judge.sampling.max_tokens,
        "rollout_steps": rew.monte_carlo.sampling.max_tokens,
        "evaluate": ev.decoding.cot_max_tokens,
    }
    return Paper(
        rounds=params.evolution.rounds,
        samples_per_seed=params.sft.samples_per_seed,
        evolutions_per_parent=params.evolution.evolutions_per_parent,
        judges=int(params.elimination.equal_judge) + int(params.elimination.solvable_judge),
        k=k,
        k_cot=sol.k_cot,
        k_pot=sol.k_pot,
        sibling_k=rew.siblings.k,
        share=rew.siblings.share,
        max_parents_per_round=rew.siblings.max_parents_per_round,
        max_solutions_per_round=rew.steps.max_solutions_per_round,
        mc_n=rew.monte_carlo.n,
        eval_requests=items * len(ev.models) * len(ev.modes),
        batch_size=params.engine.batch_size,
        caps=caps,
    )


# -- the projection -------------------------------------------------------------------------


@dataclass
class StageProjection:
    stage: str
    unit: str
    demo_units: float
    units: float
    requests: float
    sent: float
    prompt_tokens: float
    completion_tokens: float
    completions: float
    completion_tokens_at_caps: float
    cache_bytes: float

    def gpu_hours(self, tps: float, prefill_tps: float, at_caps: bool = False) -> float:
        out = self.completion_tokens_at_caps if at_caps else self.completion_tokens
        return (out / tps + self.prompt_tokens / prefill_tps) / 3600.0


def instructions_per_seed(demo: Demo, paper: Paper) -> float:
    """1 + kept evolutions per seed and round x rounds (x evolutions per parent)."""
    per_round = (demo.sizes["instructions"] / demo.sizes["seeds"] - 1.0) / demo.sizes["rounds"]
    epp = paper.evolutions_per_parent / demo.params["evolution"]["evolutions_per_parent"]
    return 1.0 + per_round * paper.rounds * epp


def project_units(demo: Demo, paper: Paper, seeds: float, ips: float) -> dict[str, float]:
    d = demo.sizes
    epp = paper.evolutions_per_parent / demo.params["evolution"]["evolutions_per_parent"]
    instructions = seeds * ips
    parents = seeds * d["parents"] / (d["seeds"] * d["rounds"]) * paper.rounds
    eligible = seeds * d["eligible_parents"] / d["seeds"] * paper.rounds / d["rounds"]
    sibling_parents = eligible * paper.share
    if paper.max_parents_per_round is not None:
        sibling_parents = min(sibling_parents, paper.max_parents_per_round * paper.rounds)
    judged = min(paper.max_solutions_per_round * (paper.rounds + 1), instructions * paper.k_cot)
    return {
        "sft_answers": seeds,
        "evolve": parents,
        "eliminate": parents * epp * d["generated"] / d["parents"],
        "solve": instructions,
        "evolve_siblings": sibling_parents,
        "rank_siblings": sibling_parents * d["groups"] / d["sibling_parents"],
        "judge_steps": judged,
        "rollout_steps": judged * d["rolled"] / d["judged"],
        "evaluate": float(paper.eval_requests),
        "instructions": instructions,
    }


def factors(demo: Demo, paper: Paper) -> dict[str, tuple[float, float, float]]:
    """Per stage: (requests, prompt tokens per request, completions per request) paper/demo."""
    p = demo.params
    return {
        "sft_answers": (paper.samples_per_seed / p["sft"]["samples_per_seed"], 1.0, 1.0),
        "evolve": (paper.evolutions_per_parent / p["evolution"]["evolutions_per_parent"], 1, 1),
        "eliminate": ((1 + paper.judges) / (1 + p["elimination"]["judges"]), 1.0, 1.0),
        "solve": (1.0, 1.0, paper.k / p["solutions"]["k"]),
        "evolve_siblings": (paper.sibling_k / p["siblings"]["k"], 1.0, 1.0),
        "rank_siblings": (1.0, (paper.sibling_k + 1) / (p["siblings"]["k"] + 1), 1.0),
        "judge_steps": (1.0, 1.0, 1.0),
        "rollout_steps": (1.0, 1.0, paper.mc_n / p["monte_carlo"]["n"]),
        "evaluate": (1.0, 1.0, 1.0),
    }


def project(demo: Demo, paper: Paper, seeds: float, ips: float) -> list[StageProjection]:
    units = project_units(demo, paper, seeds, ips)
    fac = factors(demo, paper)
    out = []
    for stage, _dataset, unit in LLM_STAGES:
        c = demo.counters[stage]
        cache = demo.cache.get(stage, {})
        req_f, prompt_f, comp_f = fac[stage]
        requests = c.requests / demo.units[stage] * units[stage] * req_f
        miss_share = c.misses / c.requests if c.requests else 0.0
        sent = requests * miss_share
        per_sent_prompt = c.prompt_tokens / c.misses if c.misses else 0.0
        per_sent_completion = c.completion_tokens / c.misses if c.misses else 0.0
        # completions per sent request (n samples): from the cache, else one
        records = cache.get("records", 0.0)
        n_per = cache.get("completions", 0.0) / records if records else 1.0
        completions = sent * n_per * comp_f
        bytes_per_record = cache.get("bytes", 0.0) / records if records else 0.0
        out.append(
            StageProjection(
                stage=stage,
                unit=unit,
                demo_units=demo.units[stage],
                units=units[stage],
                requests=requests,
                sent=sent,
                prompt_tokens=sent * per_sent_prompt * prompt_f,
                completion_tokens=sent * per_sent_completion * comp_f,
                completions=completions,
                completion_tokens_at_caps=completions * paper.caps[stage],
                cache_bytes=sent * bytes_per_record * comp_f,
            )
        )
    return out


# Which demo work a dataset's rows grow with (ratio paper units / demo units of that stage).
DATASET_DRIVER = {
    "seeds": "sft_answers",
    "seeds_rejected": "sft_answers",
    "sft_answers": "sft_answers",
    "evolutions": "evolve",
    "elimination": "eliminate",
    "elimination_checks": "eliminate",
    "solutions": "solve",
    "answers": "solve",
    "rewards": "solve",
    "siblings": "evolve_siblings",
    "instruction_rankings": "rank_siblings",
    "irm_pairs": "rank_siblings",
    "irm_set": "rank_siblings",
    "segmented_solutions": "judge_steps",
    "step_judgments": "judge_steps",
    "step_rollouts": "rollout_steps",
    "step_labels": "rollout_steps",
    "prm_steps": "rollout_steps",
    "eval_items": "evaluate",
    "eval_contamination": "evaluate",
    "eval_requests": "evaluate",
    "eval_results": "evaluate",
    "eval_scores": None,
    "funnel": None,
}
# every other dataset (instructions, pool, eliminated, dedup, difficulty, sft_set, rl_prompts)
# grows with the instructions


def row_factor(name: str, demo: Demo, paper: Paper) -> float:
    """Rows per unit, paper/demo: a row per sample (solutions, rewards), per sibling, per
    ranked pair (k(k+1)/2 in a group of k siblings and the data flow's own evolution)."""
    k, sk = demo.params["solutions"]["k"], demo.params["siblings"]["k"]
    if name in ("solutions", "rewards"):
        return paper.k / k
    if name == "siblings":
        return paper.sibling_k / sk
    if name in ("irm_pairs", "irm_set"):
        return (paper.sibling_k * (paper.sibling_k + 1)) / (sk * (sk + 1))
    return 1.0


def storage(demo: Demo, paper: Paper, seeds: float, ips: float) -> dict[str, dict[str, float]]:
    units = project_units(demo, paper, seeds, ips)
    out = {}
    for name, entry in demo.datasets.items():
        if entry["rows"] <= 0:
            continue
        base = name.removeprefix("_shard.")
        driver = DATASET_DRIVER.get(base, "instructions")
        if driver is None:
            ratio = 1.0
        elif driver == "instructions":
            ratio = units["instructions"] / demo.sizes["instructions"]
        else:
            ratio = units[driver] / demo.units[driver] * row_factor(base, demo, paper)
        out[name] = {
            "bytes_per_row": entry["bytes"] / entry["rows"],
            "rows": entry["rows"] * ratio,
            "bytes": entry["bytes"] * ratio,
        }
    return out


def index_bytes_per_key(samples: int = 20000) -> float:
    """Memory the request cache's in-memory index costs per key (measured with tracemalloc)."""
    segment = Path("seg-0-000000000000.jsonl")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = {f"{i:064x}": _Location(segment, i * 1000, 1000 + i) for i in range(samples)}
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del index
    return (after - before) / samples


# -- output ---------------------------------------------------------------------------------


def _n(x: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}" if x != int(x) else f"{int(x)}"


def _b(x: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def report(
    demo: Demo,
    paper: Paper,
    config: str,
    seeds_list: list[float],
    gpus: list[int],
    tps: float,
    prefill_tps: float,
    ips: float,
) -> str:
    lines: list[str] = []
    add = lines.append
    shown = Path(config).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    add(f"## Scale model: {shown} from the demo home's counts\n")
    add(
        f"Throughput: {tps:,.0f} generated + {prefill_tps:,.0f} prompt tokens/s per GPU, an "
        "ASSUMPTION for a 7B/8B bf16 model (the paper profile's Qwen2.5-7B-Instruct) on vLLM, "
        "one H100 80GB, large generation-heavy batches; not measured here (no vLLM GPU figure "
        "in bench/RESULTS.md; the stored vLLM v0.6.0 performance post gives relative gains "
        "only): replace with `vllm bench throughput` on the target GPU.\n"
    )
    d = demo.sizes
    add(
        f"Demo: {d['seeds']:.0f} seeds, {d['rounds']:.0f} rounds, {d['instructions']:.0f} "
        f"instructions ({d['instructions'] / d['seeds']:.2f} per seed). Paper profile: "
        f"{paper.rounds} rounds, k_cot {paper.k_cot} + k_pot {paper.k_pot}, "
        f"samples/seed {paper.samples_per_seed}, siblings k {paper.sibling_k} (share "
        f"{paper.share}), elimination judges {paper.judges}, Monte Carlo n {paper.mc_n}, step "
        f"labels <= {paper.max_solutions_per_round}/round, {paper.eval_requests:,} eval "
        f"requests; {ips:.2f} instructions per seed.\n"
    )
    add("### Per stage: the demo's rates\n")
    add(
        "| stage | unit | demo units | requests/unit | hit share | prompt tok/sent | "
        "completion tok/sent | requests/seed | requests/instruction | requests/round |"
    )
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for stage, _dataset, unit in LLM_STAGES:
        c = demo.counters[stage]
        u = demo.units[stage]
        add(
            f"| {stage} | {unit} | {u:.0f} | {c.requests / u:.2f} | "
            f"{(c.hits / c.requests if c.requests else 0):.2f} | "
            f"{(c.prompt_tokens / c.misses if c.misses else 0):.0f} | "
            f"{(c.completion_tokens / c.misses if c.misses else 0):.0f} | "
            f"{c.requests / d['seeds']:.2f} | {c.requests / d['instructions']:.2f} | "
            f"{c.requests / d['rounds']:.2f} |"
        )
    add("")
    for seeds in seeds_list:
        rows = project(demo, paper, seeds, ips)
        add(f"### {seeds:,.0f} seeds: {seeds * ips:,.0f} instructions\n")
        add(
            "| stage | units | requests | sent | prompt tokens | completion tokens | "
            "GPU-h | completion tokens at caps | GPU-h at caps |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        total = {"req": 0.0, "sent": 0.0, "p": 0.0, "c": 0.0, "cc": 0.0, "h": 0.0, "hc": 0.0}
        for r in rows:
            h, hc = r.gpu_hours(tps, prefill_tps), r.gpu_hours(tps, prefill_tps, at_caps=True)
            total["req"] += r.requests
            total["sent"] += r.sent
            total["p"] += r.prompt_tokens
            total["c"] += r.completion_tokens
            total["cc"] += r.completion_tokens_at_caps
            total["h"] += h
            total["hc"] += hc
            add(
                f"| {r.stage} | {_n(r.units)} | {_n(r.requests)} | {_n(r.sent)} | "
                f"{_n(r.prompt_tokens)} | {_n(r.completion_tokens)} | {h:,.1f} | "
                f"{_n(r.completion_tokens_at_caps)} | {hc:,.1f} |"
            )
        add(
            f"| **total** | | **{_n(total['req'])}** | **{_n(total['sent'])}** | "
            f"**{_n(total['p'])}** | **{_n(total['c'])}** | **{total['h']:,.1f}** | "
            f"**{_n(total['cc'])}** | **{total['hc']:,.1f}** |"
        )
        add("")
        evolve_round = next(r for r in rows if r.stage == "evolve").requests / paper.rounds
        add(
            "| GPUs | wall-clock h (demo lengths) | wall-clock h (at caps) | evolve requests "
            "per GPU per round |"
        )
        add("|---:|---:|---:|---:|")
        for n in gpus:
            per_gpu = evolve_round / n
            note = f"{per_gpu:,.0f}" + (
                f" (< batch {paper.batch_size}: GPU underfilled)"
                if per_gpu < paper.batch_size
                else ""
            )
            add(f"| {n} | {total['h'] / n:,.2f} | {total['hc'] / n:,.2f} | {note} |")
        add("")
        store = storage(demo, paper, seeds, ips)
        total_bytes = sum(s["bytes"] for s in store.values())
        biggest = sorted(store.items(), key=lambda kv: -kv[1]["bytes"])[:6]
        add(
            f"Storage (parquet, every version incl. `_shard.*` copies): {_b(total_bytes)}; "
            "largest: "
            + ", ".join(
                f"{name} {_b(s['bytes'])} ({_n(s['rows'])} rows x {s['bytes_per_row']:.0f} B)"
                for name, s in biggest
            )
            + ". Model checkpoints are extra and do not grow with the seeds.\n"
        )
        add(bottlenecks(demo, rows, seeds, total["h"], max(gpus)))
    return "\n".join(lines)


def projected_shard_versions(
    demo: Demo, rows: list[StageProjection], declarations: dict[str, tuple[int, int]]
) -> float:
    """`_shard.*` versions a run writes: per version of each sharded stage, its units cut into
    shards of the declared size (at least one), one version per output."""
    total = 0.0
    for r in rows:
        if r.stage not in declarations:
            continue
        size, outputs = declarations[r.stage]
        versions = demo.stage_versions[r.stage]
        total += versions * max(1.0, r.units / versions / size) * outputs
    return total


def bottlenecks(
    demo: Demo, rows: list[StageProjection], seeds: float, gpu_hours: float, gpus: int
) -> str:
    records = sum(r.sent for r in rows)
    cache_bytes = sum(r.cache_bytes for r in rows)
    per_key = index_bytes_per_key()
    shard_versions = projected_shard_versions(demo, rows, shard_declarations())
    versions = demo.versions
    return (
        "Where the single-machine design stops:\n\n"
        f"- **Catalog (one DuckDB writer, a register per version)**: the demo registered "
        f"{versions} versions; the paper run registers about as many (one per stage and round, "
        f"not per row), so the catalog's write rate is not the limit at {seeds:,.0f} seeds. What "
        "matters is who writes it: the executors already publish from the flow's driver only "
        "(task runs, local or on a cluster, never open `catalog.duckdb`; manifests on storage "
        "stay the truth, `catalog rebuild` reads them). Left: the catalog file lives on the "
        "driver's disk under a local file lock; with the home on object storage it must be "
        "rebuilt from the manifests where it is read, or kept beside the driver.\n"
        f"- **Shard versions and files**: ~{_n(shard_versions)} `_shard.*` versions (shards "
        f"of 256-512 rows, one version per output; demo: {demo.shard_versions}), "
        f"~{_n(shard_versions * 3)} "
        f"files with their folders (demo home: {demo.files} parquet + manifest files). Fine "
        "for a file system; on object storage every one is a PUT and a manifest commit: "
        "content-named parts with conditional puts, listed through manifests, never by "
        "directory listing.\n"
        f"- **Request cache**: ~{_n(records)} records, ~{_b(cache_bytes)} of JSONL (demo: "
        f"{sum(c['records'] for c in demo.cache.values()):.0f} records in "
        f"{demo.cache_segments} segments). Every process indexes every segment when it opens "
        f"the cache: {per_key:.0f} B of memory per key (measured) = {_b(records * per_key)} "
        f"per process, and it reads {_b(cache_bytes)} to build it; one segment per process "
        "means one file per Ray worker, and the segments live on a local disk other nodes "
        "cannot read. Change: a content-addressed cache on object storage (one object, or "
        "one packed object per shard, keyed by the request hash, written with a conditional "
        "put; a shard looks up only its own keys), never a full index in memory.\n"
        f"- **Run lock**: one run per home, held for the whole run: {gpu_hours:,.0f} GPU-h of "
        f"work (on {gpus} GPUs about "
        f"{gpu_hours / gpus:,.2f} h wall-clock) during which a nightly run or a second user "
        "waits; and the lock is a local `filelock`, which guards nothing across nodes or on "
        "S3. Change: a lease object on the shared storage (conditional put with an expiry, "
        "renewed by the driver) held by the driver only; idempotent, content-named writes "
        "make a second writer harmless rather than forbidden.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None, help="demo data home (read only)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "paper.yaml"))
    parser.add_argument("--seeds", type=float, nargs="+", default=[15_000, 1_000_000])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--tokens-per-s-per-gpu", type=float, default=DEFAULT_TPS)
    parser.add_argument("--prefill-tokens-per-s-per-gpu", type=float, default=DEFAULT_PREFILL_TPS)
    parser.add_argument(
        "--instructions-per-seed",
        type=float,
        default=None,
        help="override the demo's measured growth (WizardMath: 96k from 15k = 6.4)",
    )
    args = parser.parse_args(argv)
    try:
        demo = read_demo(args.home or default_home())
        paper = paper_sizes(load_params(args.config, []))
        ips = args.instructions_per_seed or instructions_per_seed(demo, paper)
        print(
            report(
                demo,
                paper,
                args.config,
                args.seeds,
                args.gpus,
                args.tokens_per_s_per_gpu,
                args.prefill_tokens_per_s_per_gpu,
                ips,
            )
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
