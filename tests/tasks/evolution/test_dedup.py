"""Dedup and decontamination: exact, near (MinHash/LSH in DuckDB), n-gram and embedding rules."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import polars as pl
import pytest

from storage.catalog import connect
from tasks.benchmarks import BenchmarkError
from tasks.evolution.dedup import (
    Benchmark,
    DecontamParams,
    DedupInputError,
    DedupParams,
    count_by_rule,
    dedup_and_decontaminate,
    find_contamination,
    find_duplicates,
    normalize_texts,
)

# An original problem of GSM8K length (~45 words), and others on the same topics.
TRAIN = (
    "A bakery sells muffins for $3 each and cookies for $2 each. On Monday it sold 45 muffins "
    "and twice as many cookies as muffins. On Tuesday it sold 10 fewer muffins than on Monday "
    "and the same number of cookies. How much money did the bakery make over the two days?"
)
TRAIN_ONE_WORD = TRAIN.replace("On Tuesday it sold", "On Wednesday it sold")
DIFFERENT = [
    "A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 hours. "
    "How far does it travel in total?",
    "Find all real numbers $x$ such that $x^2 - 5x + 6 = 0$.",
    "Maria has 12 apples. She gives a third of them to her brother and eats 2. "
    "How many apples does she have left?",
    "A rectangle has a perimeter of 30 cm and a length of 9 cm. What is its area?",
]
JANET = (
    "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
    "muffins for her friends every day with four. She sells the remainder at the farmers' market "
    "daily for $2 per fresh duck egg. How much in dollars does she make every day at the "
    "farmers' market?"
)
# GSM8K test line 1, lightly paraphrased: a new name, one number changed, a few words changed.
JANET_PARAPHRASE = (
    "Maria's ducks lay 18 eggs per day. She eats three for breakfast every morning and bakes "
    "cakes for her friends every day with four. She sells the rest at the farmers' market "
    "daily for $2 per fresh duck egg. How many dollars does she make every day at the "
    "farmers' market?"
)
# Same topic and vocabulary, a different problem.
DUCKS_UNRELATED = (
    "Tom keeps chickens that lay 20 eggs per day. He uses 5 eggs every day to bake bread and "
    "gives 3 eggs to his neighbour. He packs the remaining eggs in boxes of 6. How many full "
    "boxes does he pack in a week?"
)


def frame(rows: dict[str, str], column: str = "text") -> pl.DataFrame:
    return pl.DataFrame({"id": list(rows), column: list(rows.values())})


def write(path: Path, df: pl.DataFrame) -> Path:
    df.write_parquet(path)
    return path


def by_id(removed: pl.DataFrame) -> dict[str, dict]:
    return {row["id"]: row for row in removed.iter_rows(named=True)}


@pytest.fixture
def small_bench(tmp_path) -> list[Benchmark]:
    path = tmp_path / "bench.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"question": q})
            for q in [JANET, "What is the sum of the first 100 positive even integers?"]
        )
        + "\n"
    )
    return [Benchmark(name="toy", path=path, text_field="question")]


# ---------------------------------------------------------------------------------------------
# Normalisation and exact duplicates


def test_normalisation_unifies_formatting():
    out = normalize_texts(
        [
            "It costs $1,000,000.",
            "it   COSTS 1000000",
            "Pay 3.50 dollars, then 2.0 more",
            "pay $3.5 dollars then 2 more!",
            r"Find $\dfrac{1}{2}\,\left(x\right)$",
            r"find $\frac{1}{2}(x)$",
            r"It has 1{,}000 or 1\,000 sides",
            "it has 1000 or 1000 sides",
        ]
    )
    assert out[0] == out[1] == "it costs 1000000"
    assert out[2] == out[3]
    assert out[4] == out[5]
    assert out[6] == out[7]
    # A decimal point is not a word break: 3.5 is not 35 and not "3 5".
    assert normalize_texts(["3.5"]) != normalize_texts(["35"])
    assert normalize_texts(["3.5"]) != normalize_texts(["3 5"])


def test_exact_duplicates_after_normalisation_are_found():
    candidates = frame(
        {
            "c1": TRAIN,
            "c2": TRAIN.upper().replace(" ", "   "),
            "c3": TRAIN.replace(".", " .").replace("?", "!!"),
            "c4": "Pay 1,000 dollars and 3.50 cents.",
            "c5": "pay 1000 DOLLARS and 3.5 cents",
            **{f"d{i}": text for i, text in enumerate(DIFFERENT)},
        }
    )
    removed = by_id(find_duplicates(connect(), candidates, None, DedupParams()))
    assert set(removed) == {"c2", "c3", "c5"}
    assert removed["c2"]["collided_with"] == "c1"
    assert removed["c3"]["collided_with"] == "c1"
    assert removed["c5"]["collided_with"] == "c4"
    assert {r["rule"] for r in removed.values()} == {"exact_duplicate"}


# ---------------------------------------------------------------------------------------------
# Near duplicates


def test_near_duplicate_found_with_collided_id_and_different_problems_kept():
    candidates = frame(
        {"a": TRAIN, "b": TRAIN_ONE_WORD, **dict(zip("cdef", DIFFERENT, strict=True))}
    )
    removed = find_duplicates(connect(), candidates, None, DedupParams())
    assert removed["id"].to_list() == ["b"]
    row = removed.row(0, named=True)
    assert row["rule"] == "near_duplicate"
    assert row["collided_with"] == "a"
    assert 0.7 <= row["similarity"] < 1.0
    assert "shingles shared" in row["detail"]


def test_later_id_is_the_one_removed():
    candidates = frame({"z-late": TRAIN, "a-early": TRAIN_ONE_WORD})
    removed = find_duplicates(connect(), candidates, None, DedupParams())
    assert removed["id"].to_list() == ["z-late"]
    assert removed["collided_with"].to_list() == ["a-early"]


def test_duplicates_against_prior_rounds_and_seeds(tmp_path):
    seeds = write(tmp_path / "seeds.parquet", frame({"gsm8k-1": TRAIN}, column="question"))
    round1 = write(
        tmp_path / "round1.parquet",
        pl.DataFrame(
            {"id": ["r1-1", "r1-2"], "round": [1, 1], "text": [DIFFERENT[0], TRAIN_ONE_WORD]}
        ),
    )
    candidates = write(
        tmp_path / "round2.parquet",
        frame(
            {
                "r2-1": TRAIN_ONE_WORD.lower(),  # exact duplicate of round 1 (and near of a seed)
                "r2-2": DIFFERENT[0].replace("60 miles", "65 miles"),  # near duplicate, round 1
                "r2-3": TRAIN.replace("$3 each", "$3.00 each"),  # exact duplicate of the seed
                "r2-4": DIFFERENT[1],
            }
        ),
    )
    removed = by_id(find_duplicates(connect(), candidates, [seeds, round1], DedupParams()))
    assert set(removed) == {"r2-1", "r2-2", "r2-3"}
    assert (removed["r2-1"]["rule"], removed["r2-1"]["collided_with"]) == (
        "exact_duplicate",
        "r1-2",
    )
    assert (removed["r2-2"]["rule"], removed["r2-2"]["collided_with"]) == (
        "near_duplicate",
        "r1-1",
    )
    assert (removed["r2-3"]["rule"], removed["r2-3"]["collided_with"]) == (
        "exact_duplicate",
        "gsm8k-1",
    )
    # The seed and round-1 instruction are near duplicates of each other, but prior rows are
    # never reported: they are kept whatever they are.
    assert not set(removed) & {"gsm8k-1", "r1-1", "r1-2"}


def test_banding_is_what_finds_candidates():
    """With one band of 128 rows a pair at Jaccard ~0.8 becomes an LSH candidate with
    probability 0.8^128: the verified pair of the default banding is then never compared."""
    candidates = frame({"a": TRAIN, "b": TRAIN_ONE_WORD})
    assert find_duplicates(connect(), candidates, None, DedupParams()).height == 1
    one_band = DedupParams(num_perm=128, bands=1)
    assert find_duplicates(connect(), candidates, None, one_band).height == 0


def test_near_duplicates_match_brute_force_jaccard():
    """Against an exact pairwise check on a few hundred documents: every pair well above the
    threshold is found (LSH recall), and nothing below it is reported (verification)."""
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(400)]
    texts = {}
    for i in range(150):
        words = [rng.choice(vocab) for _ in range(rng.randint(30, 60))]
        texts[f"doc{i:03d}"] = " ".join(words)
        if i % 3 == 0:  # a near copy with a couple of words replaced
            for _ in range(rng.randint(1, 2)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            texts[f"doc{i:03d}b"] = " ".join(words)
    cfg = DedupParams(near_threshold=0.6)
    removed = by_id(find_duplicates(connect(), frame(texts), None, cfg))

    def shingles(text: str) -> set[str]:
        w = text.split()
        return {" ".join(w[i : i + 3]) for i in range(len(w) - 2)}

    sets = {k: shingles(v) for k, v in texts.items()}
    ids = sorted(texts)
    expected_dups = set()
    for i, a in enumerate(ids):
        for b in ids[:i]:
            jac = len(sets[a] & sets[b]) / len(sets[a] | sets[b])
            if jac >= 0.75:  # LSH candidate probability > 0.999 with 32 bands of 4
                expected_dups.add(a)
    assert expected_dups, "the planted near copies should exist"
    assert expected_dups <= set(removed)
    for doc, row in removed.items():
        other = row["collided_with"]
        jac = len(sets[doc] & sets[other]) / len(sets[doc] | sets[other])
        assert jac == pytest.approx(row["similarity"])
        assert jac >= 0.6 and other < doc


# ---------------------------------------------------------------------------------------------
# Contamination


def test_paraphrased_gsm8k_test_question_is_contaminated(shared_data):
    candidates = frame({"para": JANET_PARAPHRASE, "unrelated": DUCKS_UNRELATED, "train": TRAIN})
    found = by_id(find_contamination(connect(), candidates, DecontamParams()))
    assert set(found) == {"para"}
    assert found["para"]["rule"] == "contaminated_ngram"
    assert found["para"]["collided_with"] == "gsm8k_test:1"
    assert found["para"]["similarity"] >= 0.3


def test_math_test_problem_with_other_numbers_is_contaminated(shared_data):
    first = json.loads((shared_data / "math" / "test.jsonl").open().readline())
    changed = re.sub(r"x\^2\+x-6", "x^2+2x-8", first["problem"])
    assert changed != first["problem"]
    found = find_contamination(connect(), frame({"m": changed}), DecontamParams())
    assert found["collided_with"].to_list() == [f"math_test:{first['id']}"]


def test_benchmark_cache_is_built_once(small_bench, tmp_path):
    cfg = DecontamParams(benchmarks=small_bench, cache_dir=tmp_path / "cache")
    find_contamination(connect(), frame({"x": JANET}), cfg)
    (cached,) = list((tmp_path / "cache").glob("toy-ngrams-*.parquet"))
    stamp = cached.stat().st_mtime_ns
    found = find_contamination(connect(), frame({"x": JANET}), cfg)
    assert found["collided_with"].to_list() == ["toy:1"]
    assert cached.stat().st_mtime_ns == stamp
    # A changed benchmark file is a new cache entry.
    small_bench[0].path.write_text(json.dumps({"question": TRAIN}) + "\n")
    assert find_contamination(connect(), frame({"x": JANET}), cfg).is_empty()
    assert len(list((tmp_path / "cache").glob("toy-ngrams-*.parquet"))) == 2


# ---------------------------------------------------------------------------------------------
# The stage


def test_counts_reconcile_and_first_reason_wins(tmp_path, small_bench):
    seeds = write(tmp_path / "seeds.parquet", frame({"s1": TRAIN}, column="question"))
    rows = {
        "c1": TRAIN.lower(),  # exact duplicate of the seed
        "c2": JANET,  # contaminated ...
        "c3": JANET + " ",  # ... and an exact duplicate of c2: exact wins
        "c4": TRAIN_ONE_WORD,  # near duplicate of the seed
        "c5": DIFFERENT[0],
        "c6": DIFFERENT[1],
    }
    candidates = write(
        tmp_path / "cands.parquet",
        frame(rows).with_columns(pl.lit(2).alias("round"), pl.lit("upward").alias("direction")),
    )
    kept, removed = dedup_and_decontaminate(
        candidates, [seeds], DedupParams(), DecontamParams(benchmarks=small_bench)
    )
    assert kept.height + removed.height == len(rows)
    assert set(kept["id"]) | set(removed["id"]) == set(rows)
    assert sorted(kept["id"]) == ["c5", "c6"]
    assert kept.columns == ["id", "text", "round", "direction"]
    assert removed.columns == [
        "id", "text", "round", "direction", "rule", "collided_with", "similarity", "detail"
    ]  # fmt: skip
    rules = dict(zip(removed["id"], removed["rule"], strict=True))
    assert rules == {
        "c1": "exact_duplicate",
        "c2": "contaminated_ngram",
        "c3": "exact_duplicate",
        "c4": "near_duplicate",
    }
    assert count_by_rule(removed) == {
        "exact_duplicate": 2,
        "near_duplicate": 1,
        "contaminated_ngram": 1,
        "contaminated_embedding": 0,
    }


def test_nothing_to_remove_keeps_everything(small_bench):
    candidates = frame(dict(zip("abcd", DIFFERENT, strict=True)))
    kept, removed = dedup_and_decontaminate(
        candidates, None, decontam_cfg=DecontamParams(benchmarks=small_bench)
    )
    assert kept.height == 4 and removed.is_empty()


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_text_column_names_the_file(tmp_path):
    bad = write(tmp_path / "bad.parquet", pl.DataFrame({"id": ["a"], "body": ["x"]}))
    with pytest.raises(DedupInputError, match=r"bad\.parquet: none of the text columns"):
        find_duplicates(connect(), bad, None)


def test_null_text_names_the_row(tmp_path):
    bad = write(tmp_path / "nulls.parquet", pl.DataFrame({"id": ["a", "b"], "text": ["x", None]}))
    with pytest.raises(DedupInputError, match=r"nulls\.parquet row 1: null text"):
        find_duplicates(connect(), bad, None)


def test_repeated_candidate_id_is_refused():
    with pytest.raises(DedupInputError, match="candidate id 'a' is not unique"):
        find_duplicates(connect(), pl.DataFrame({"id": ["a", "a"], "text": ["x", "y"]}), None)


def test_candidate_also_in_prior_is_refused():
    df = frame({"a": TRAIN})
    with pytest.raises(DedupInputError, match="also a prior id"):
        find_duplicates(connect(), df, df)


def test_benchmark_row_without_text_field_names_the_line(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"question": "q"}) + "\n" + json.dumps({"problem": "p"}) + "\n")
    cfg = DecontamParams(
        benchmarks=[Benchmark(name="b", path=path, text_field="question")], cache_dir=tmp_path
    )
    with pytest.raises(BenchmarkError, match=r"b\.jsonl line 2: field 'question' missing"):
        find_contamination(connect(), frame({"x": "y"}), cfg)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="multiple of bands"):
        DedupParams(num_perm=100, bands=32)
    with pytest.raises(ValueError, match="near_threshold"):
        DedupParams(near_threshold=0)


# ---------------------------------------------------------------------------------------------
# Embeddings


@pytest.mark.slow
def test_embedding_catches_a_rewording_that_ngrams_miss(shared_data, tmp_path):
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:20]
    bench = tmp_path / "gsm8k_head.jsonl"
    bench.write_text("\n".join(lines) + "\n")
    reworded = (
        "Every day, the ducks owned by Carla produce 16 eggs. Each morning she has three of them "
        "for breakfast, and she uses four more to bake muffins for her friends. The rest she "
        "sells at the farmers market at $2 per egg. How many dollars does she earn daily at the "
        "market?"
    )
    candidates = frame({"reworded": reworded, "unrelated": DUCKS_UNRELATED})
    specs = [Benchmark(name="gsm8k_test", path=bench, text_field="question")]
    ngram_only = DecontamParams(benchmarks=specs, cache_dir=tmp_path / "cache")
    assert find_contamination(connect(), candidates, ngram_only).is_empty()
    with_embeddings = DecontamParams(
        benchmarks=specs, cache_dir=tmp_path / "cache", embeddings=True
    )
    found = find_contamination(connect(), candidates, with_embeddings)
    assert found["id"].to_list() == ["reworded"]
    row = found.row(0, named=True)
    assert row["rule"] == "contaminated_embedding"
    assert row["collided_with"] == "gsm8k_test:1"
    assert row["similarity"] >= 0.9
    assert list((tmp_path / "cache").glob("gsm8k_test-emb-*.npy"))
