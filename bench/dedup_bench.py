"""Benchmark of dedup + decontamination (tasks/evolution/dedup.py) against datasketch's MinHashLSH.

Synthesises N evolved-looking instructions from the seeds (GSM8K train + MATH train): each base
instruction joins sentences of five different seed questions (four statements and a question)
with every number redrawn, so that base instructions are distinct from one another. Into them it
plants, at known rates, exact duplicates (case, spacing, punctuation, "1000" -> "1,000" changed),
near duplicates (1-3 word substitutions, deletions or insertions) and paraphrased benchmark test
questions (a new name, one number changed, two words replaced). Ids are shuffled, so a planted
copy may come before its original. The seeds are the prior set.

Then, each in its own process so that peak memory is its own:
- ours: `dedup_and_decontaminate` (exact + near + n-gram contamination against GSM8K test and
  MATH test): wall time by stage, peak RSS (DuckDB included), recall and precision on the plants;
- datasketch: the near-duplicate stage alone, on the same documents our near stage sees (the
  normalised texts left after exact dedup, prior included), with the same word 3-shingles, 128
  permutations, 32 bands of 4 rows (`params=(32, 4)`), the same id order and the same exact
  Jaccard verification; `MinHash.bulk` hashes the shingles. Its speed is compared with our near
  stage, which does the same work.

Run: `.venv/bin/python bench/dedup_bench.py [--n 100000] [--also-1m] [--datasketch-n N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXACT_RATE = 0.05
NEAR_RATE = 0.05
CONTAMINATED_RATE = 0.002
NAMES = ["Maria", "Kevin", "Aisha", "Pedro", "Lena", "Omar", "Sofia", "Ravi", "Chen", "Olga"]
SENTENCE = re.compile(r"(?<=[.?!])\s+(?=[A-Z$])")
NUMBER = re.compile(r"\d+")
# Statements per synthetic instruction (then a question): ~65 words, the length of an evolved
# instruction after a round or two of "add constraints" / "increase reasoning".
STATEMENTS = 4


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_jsonl(path: Path, field: str) -> list[str]:
    with path.open() as fh:
        return [json.loads(line)[field] for line in fh if line.strip()]


# ---------------------------------------------------------------------------------------------
# Synthesis


def redraw_numbers(text: str, rng: random.Random) -> str:
    return NUMBER.sub(lambda m: str(rng.randint(2, 999)), text)


def reformat(text: str, rng: random.Random) -> str:
    """The same text to the exact-duplicate rule: case, spacing, punctuation, number format."""
    out = NUMBER.sub(lambda m: f"{int(m.group()):,}" if len(m.group()) >= 4 else m.group(), text)
    out = out.upper() if rng.random() < 0.5 else out.lower()
    out = out.replace(" ", "  ").replace("?", " ?")
    return out + rng.choice(["", " ", "!"])


def edit_words(text: str, rng: random.Random, vocab: list[str]) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.6:
            words[i] = rng.choice(vocab)
        elif op < 0.8 and len(words) > 5:
            del words[i]
        else:
            words.insert(i, rng.choice(vocab))
    return " ".join(words)


def paraphrase(text: str, rng: random.Random, vocab: list[str]) -> str:
    names = {w for w in re.findall(r"\b[A-Z][a-z]+\b", text[1:]) if w not in {"How", "What"}}
    if names:
        text = re.sub(rf"\b{re.escape(sorted(names)[0])}\b", rng.choice(NAMES), text)
    numbers = NUMBER.findall(text)
    if numbers:
        n = rng.choice(numbers)
        text = re.sub(rf"\b{n}\b", str(int(n) + rng.randint(1, 9)), text, count=1)
    words = text.split()
    for _ in range(2):
        words[rng.randrange(len(words))] = rng.choice(vocab)
    return " ".join(words)


def synthesise(n: int, data: Path, out: Path, seed: int = 0) -> dict:
    rng = random.Random(seed)
    seeds = read_jsonl(data / "gsm8k" / "train.jsonl", "question") + read_jsonl(
        data / "math" / "train.jsonl", "problem"
    )
    split = [SENTENCE.split(q.strip()) for q in seeds]
    statements = [s for parts in split for s in parts[:-1] if len(s.split()) >= 5]
    questions = [parts[-1] for parts in split if len(parts) > 1]
    vocab = [w for s in statements[:5000] for w in s.split() if w.isalpha()]
    tests = [("gsm8k_test", str(i), q) for i, q in enumerate(
        read_jsonl(data / "gsm8k" / "test.jsonl", "question"), start=1)]  # fmt: skip

    n_exact, n_near = int(n * EXACT_RATE), int(n * NEAR_RATE)
    n_contaminated = int(n * CONTAMINATED_RATE)
    n_base = n - n_exact - n_near - n_contaminated
    texts = [
        redraw_numbers(
            " ".join([*(rng.choice(statements) for _ in range(STATEMENTS)), rng.choice(questions)]),
            rng,
        )
        for _ in range(n_base)
    ]
    kinds = ["base"] * n_base
    sources: list[int] = [-1] * n_base
    picked = rng.sample(range(n_base), n_exact + n_near)  # each base copied at most once
    for k, b in enumerate(picked):
        exact = k < n_exact
        texts.append(reformat(texts[b], rng) if exact else edit_words(texts[b], rng, vocab))
        kinds.append("exact" if exact else "near")
        sources.append(b)
    contaminated_refs = []
    for _ in range(n_contaminated):
        name, ref, q = rng.choice(tests)
        texts.append(paraphrase(q, rng, vocab))
        kinds.append("contaminated")
        sources.append(-1)
        contaminated_refs.append(f"{name}:{ref}")

    order = list(range(len(texts)))
    rng.shuffle(order)  # ids in random order: a copy may precede its original
    ids = [f"r1-{order[i]:07d}" for i in range(len(texts))]
    out.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"id": ids, "round": [1] * len(ids), "op": kinds, "text": texts}).sample(
        fraction=1.0, shuffle=True, seed=seed
    ).write_parquet(out / "candidates.parquet")
    pl.DataFrame({"id": [f"seed-{i}" for i in range(len(seeds))], "question": seeds}).write_parquet(
        out / "prior.parquet"
    )
    truth = {
        "pairs": [[ids[i], ids[s], kinds[i]] for i, s in enumerate(sources) if s >= 0],
        "contaminated": [ids[i] for i, k in enumerate(kinds) if k == "contaminated"],
    }
    (out / "truth.json").write_text(json.dumps(truth))
    return {"n": len(texts), "exact": n_exact, "near": n_near, "contaminated": n_contaminated}


# ---------------------------------------------------------------------------------------------
# Workers


def planted_metrics(removed: pl.DataFrame, truth: dict, rule: str, kind: str) -> dict:
    """A planted pair is found when its later id is removed as a duplicate naming the earlier
    id (a near copy found by the exact rule counts). Precision: of the removals by `rule`, the
    share that are planted pairs of this kind."""
    dups = removed.filter(pl.col("rule").is_in(["exact_duplicate", "near_duplicate"]))
    hits = {(r["id"], r["collided_with"]): r["rule"] for r in dups.iter_rows(named=True)}
    pairs = {(max(a, b), min(a, b)) for a, b, k in truth["pairs"] if k == kind}
    by_rule = [h for h, r in hits.items() if r == rule]
    found = sum(1 for p in pairs if p in hits)
    return {
        "planted": len(pairs),
        "found": found,
        "recall": found / max(len(pairs), 1),
        "removed": len(by_rule),
        "precision": sum(1 for h in by_rule if h in pairs) / max(len(by_rule), 1),
    }


def run_ours(folder: Path, memory_limit: str, threads: int | None) -> dict:
    from storage.catalog import connect
    from tasks.evolution.dedup import (
        DecontamParams,
        DedupParams,
        count_by_rule,
        dedup_and_decontaminate,
    )

    truth = json.loads((folder / "truth.json").read_text())
    timings: dict[str, float] = {}
    con = connect()
    start = time.perf_counter()
    kept, removed = dedup_and_decontaminate(
        folder / "candidates.parquet",
        [folder / "prior.parquet"],
        DedupParams(memory_limit=memory_limit, threads=threads),
        DecontamParams(),
        con=con,
        timings=timings,
    )
    wall = time.perf_counter() - start
    duckdb_threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    con.close()
    contaminated = set(truth["contaminated"])
    flagged = set(removed.filter(pl.col("rule") == "contaminated_ngram")["id"])
    return {
        "wall_s": wall,
        "duckdb_threads": duckdb_threads,
        "stages_s": timings,
        "peak_rss_gib": peak_rss_gib(),
        "kept": kept.height,
        "removed": removed.height,
        "by_rule": count_by_rule(removed),
        "exact": planted_metrics(removed, truth, "exact_duplicate", "exact"),
        "near": planted_metrics(removed, truth, "near_duplicate", "near"),
        "near_jaccard": jaccard_of_planted(folder, truth),
        "contamination_recall": len(flagged & contaminated) / max(len(contaminated), 1),
        "contamination_other": len(flagged - contaminated),
    }


def jaccard_of_planted(folder: Path, truth: dict) -> dict:
    """How many planted near pairs are at or above the 0.7 threshold in exact shingle Jaccard:
    the ones any MinHash method is meant to find."""
    from tasks.evolution.dedup import normalize_texts

    df = pl.read_parquet(folder / "candidates.parquet").select("id", "text")
    text = dict(zip(df["id"], df["text"], strict=False))
    pairs = [(a, b) for a, b, k in truth["pairs"] if k == "near"]
    norms = normalize_texts([text[x] for p in pairs for x in p])

    def shingles(t: str) -> set[str]:
        w = t.split()
        return {" ".join(w[i : i + 3]) for i in range(max(len(w) - 2, 1))}

    above = sum(
        1
        for i in range(len(pairs))
        if len((a := shingles(norms[2 * i])) & (b := shingles(norms[2 * i + 1]))) / len(a | b)
        >= 0.7
    )
    return {"pairs": len(pairs), "at_or_above_0.7": above}


def run_datasketch(folder: Path, limit: int | None) -> dict:
    """The near stage with datasketch, on exactly the documents our near stage compares."""
    from datasketch import MinHash, MinHashLSH

    from storage.catalog import connect
    from tasks.evolution.dedup import DedupParams, run_sql

    cfg = DedupParams()
    con = connect()
    run_sql(con, "text_macros")
    # Our exact stage's survivors, in our doc order (prior first, then candidates by id).
    con.execute(
        """CREATE TABLE docs AS
        SELECT row_number() OVER (ORDER BY is_prior DESC, id) AS doc, id, is_prior,
               ef_normalize(text) AS norm
        FROM (SELECT id, question AS text, true AS is_prior FROM read_parquet($p)
              UNION ALL SELECT id, text, false FROM read_parquet($c))""",
        {"p": str(folder / "prior.parquet"), "c": str(folder / "candidates.parquet")},
    )
    rows = con.execute(
        "SELECT id, is_prior, norm FROM docs QUALIFY doc = min(doc) OVER (PARTITION BY norm) "
        "ORDER BY doc"
    ).fetchall()
    if limit:
        n_prior = sum(1 for r in rows if r[1])
        rows = rows[: n_prior + limit]
    truth = json.loads((folder / "truth.json").read_text())

    start = time.perf_counter()
    sets = []
    for _, _, norm in rows:
        w = norm.split(" ")
        k = cfg.shingle
        grams = [" ".join(w[i : i + k]) for i in range(len(w) - k + 1)] or [norm]
        sets.append({g.encode() for g in grams})
    t_shingle = time.perf_counter() - start
    minhashes = MinHash.bulk(sets, num_perm=cfg.num_perm, seed=cfg.seed)
    t_minhash = time.perf_counter() - start - t_shingle
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    removed = []
    for n, ((doc_id, is_prior, _), mh) in enumerate(zip(rows, minhashes, strict=False)):
        if not is_prior:
            best = None
            for other in lsh.query(mh):
                a, b = sets[n], sets[other]
                jac = len(a & b) / len(a | b)
                if jac >= cfg.near_threshold and (best is None or jac > best[0]):
                    best = (jac, other)
            if best:
                removed.append({"id": doc_id, "rule": "near_duplicate",
                                "collided_with": rows[best[1]][0], "similarity": best[0]})  # fmt: skip
        lsh.insert(n, mh)
    wall = time.perf_counter() - start
    frame = pl.DataFrame(removed, schema={"id": pl.String, "rule": pl.String,
                                          "collided_with": pl.String, "similarity": pl.Float64})  # fmt: skip
    return {
        "docs": len(rows),
        "wall_s": wall,
        "stages_s": {
            "shingle": t_shingle,
            "minhash_bulk": t_minhash,
            "lsh_query_insert_verify": wall - t_shingle - t_minhash,
        },
        "peak_rss_gib": peak_rss_gib(),
        "near": planted_metrics(frame, truth, "near_duplicate", "near") if not limit else None,
    }


# ---------------------------------------------------------------------------------------------
# Driver


def worker(args: list[str], env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode:
        raise SystemExit(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(n: int, ours: dict, theirs: dict | None) -> None:
    print(f"\n== {n:,} candidate instructions (+ 14,973 seeds as prior) ==")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in ours["stages_s"].items())
    print(
        f"ours: wall {ours['wall_s']:.1f} s ({stages}); peak RSS {ours['peak_rss_gib']:.2f} GiB; "
        f"DuckDB current_setting('threads') = {ours['duckdb_threads']}"
    )
    print(f"  kept {ours['kept']:,}, removed {ours['removed']:,}: {ours['by_rule']}")
    for kind in ("exact", "near"):
        m = ours[kind]
        print(
            f"  planted {kind} duplicates: recall {m['recall']:.4f} ({m['found']}/{m['planted']}),"
            f" precision {m['precision']:.4f} ({m['removed']} removed by the rule)"
        )
    nj = ours["near_jaccard"]
    print(
        f"  planted near pairs at or above the 0.7 shingle Jaccard threshold: "
        f"{nj['at_or_above_0.7']}/{nj['pairs']}; found {ours['near']['found']} "
        "(1-3 word edits leave a short text below the threshold: not a near duplicate by it)"
    )
    print(
        f"  planted contamination: recall {ours['contamination_recall']:.4f}; "
        f"{ours['contamination_other']} other candidates flagged"
    )
    if theirs:
        ratio = theirs["wall_s"] / ours["stages_s"]["near"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in theirs["stages_s"].items())
        print(
            f"datasketch near stage on the same {theirs['docs']:,} documents: "
            f"{theirs['wall_s']:.1f} s ({stages}); peak RSS {theirs['peak_rss_gib']:.2f} GiB"
        )
        if theirs["near"]:
            m = theirs["near"]
            print(
                f"  planted near duplicates: recall {m['recall']:.4f} ({m['found']}/"
                f"{m['planted']}), precision {m['precision']:.4f}"
            )
        print(f"  speed: ours {ours['stages_s']['near']:.1f} s vs datasketch, {ratio:.1f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--also-1m", action="store_true", help="also 1,000,000 (ours only)")
    parser.add_argument("--datasketch-n", type=int, default=None,
                        help="run datasketch on the first N candidates only (default: all)")  # fmt: skip
    parser.add_argument("--no-datasketch", action="store_true")
    parser.add_argument("--memory-limit", default="3GB")
    parser.add_argument(
        "--threads", type=int, default=None, help="DuckDB threads (default: the stage's own choice)"
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--worker", choices=["ours", "datasketch"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "ours":
        print(json.dumps(run_ours(args.folder, args.memory_limit, args.threads)))
        return
    if args.worker == "datasketch":
        print(json.dumps(run_datasketch(args.folder, args.datasketch_n)))
        return

    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp:
        env = dict(os.environ, EVOLFORGE_HOME=str(Path(tmp) / "home"))
        print(f"cores {os.cpu_count()}, usable {len(os.sched_getaffinity(0))}, DuckDB threads "
              f"{args.threads or 'stage default'}, memory_limit {args.memory_limit}")  # fmt: skip
        sizes = [args.n] + ([1_000_000] if args.also_1m else [])
        for n in sizes:
            folder = Path(tmp) / f"n{n}"
            t = time.perf_counter()
            planted = synthesise(n, args.data, folder)
            print(f"synthesised {planted} in {time.perf_counter() - t:.1f} s")
            common = ["--folder", str(folder), "--memory-limit", args.memory_limit]
            if args.threads:
                common += ["--threads", str(args.threads)]
            # A first run builds the benchmark n-gram cache; the timed run uses it, as every
            # round after the first does. Both are reported.
            if n == sizes[0]:
                first = worker(["--worker", "ours", *common], env)
                print(f"(first run, building the benchmark n-gram cache: {first['wall_s']:.1f} s)")
            ours = worker(["--worker", "ours", *common], env)
            theirs = None
            if n == args.n and not args.no_datasketch:
                extra = ["--datasketch-n", str(args.datasketch_n)] if args.datasketch_n else []
                theirs = worker(["--worker", "datasketch", *common, *extra], env)
            report(n, ours, theirs)


if __name__ == "__main__":
    main()
