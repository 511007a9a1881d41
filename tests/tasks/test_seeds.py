import json

import polars as pl
import pytest

from tasks.seeds import (
    IngestParams,
    SeedError,
    SeedSource,
    gsm8k_final_answer,
    ingest,
    ingest_seeds,
    last_boxed,
)


@pytest.mark.parametrize(
    ("solution", "answer"),
    [
        ("So 2+2 = 4.\n#### 4", "4"),
        ("Total 1,200 dollars\n#### 1,200", "1200"),
        ("#### -3.5 ", "-3.5"),
        ("no marker", None),
    ],
)
def test_gsm8k_final_answer(solution, answer):
    assert gsm8k_final_answer(solution) == answer


@pytest.mark.parametrize(
    ("solution", "answer"),
    [
        ("thus $\\boxed{5}$.", "5"),
        (
            "$\\boxed{\\frac{1}{2}}$ and finally $\\boxed{\\dfrac{\\sqrt{3}}{2}}$",
            "\\dfrac{\\sqrt{3}}{2}",
        ),
        ("$\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),
        ("\\fbox{x^{2}}", "x^{2}"),
        ("The answer is $\\boxed 7$.", "7"),
        ("$\\boxed{}$", None),
        ("no box", None),
        ("$\\boxed{unclosed", None),
    ],
)
def test_last_boxed(solution, answer):
    assert last_boxed(solution) == answer


def test_reference_sets_ingest_with_correct_answers(shared_data):
    result = ingest([SeedSource(kind="gsm8k"), SeedSource(kind="math")])
    assert result.read == 7473 + 7500
    assert result.read == result.accepted + result.rejected.height
    seeds = result.seeds
    natalia = seeds.filter(pl.col("question").str.starts_with("Natalia sold clips"))
    assert natalia["answer"].to_list() == ["72"]
    algebra0 = seeds.filter(pl.col("id") == "math/train/algebra/0").row(0, named=True)
    assert algebra0["level"] == 5 and algebra0["subject"] == "Algebra" and algebra0["answer"] == "0"
    reasons = dict(result.rejected.group_by("reason").len().rows())
    # two MATH solutions end in an empty \boxed{}; one MATH question appears twice
    assert reasons == {"no_final_answer": 2, "duplicate_question": 1}
    assert set(seeds["source"].unique()) == {"gsm8k", "math"}
    assert seeds["id"].n_unique() == seeds.height


def test_sample_has_original_problems_of_both_kinds():
    result = ingest([SeedSource(kind="sample")])
    assert result.accepted >= 24 and result.rejected.height == 0
    assert result.seeds.filter(pl.col("level").is_null()).height >= 12  # GSM8K-like
    assert result.seeds.filter(pl.col("level").is_not_null()).height >= 12  # MATH-like


@pytest.fixture
def broken_jsonl(tmp_path):
    lines = [
        json.dumps({"question": "What is 2 + 3?", "answer": "It is 5.\n#### 5"}).encode(),  # 1 ok
        b'{"question": "broken json", "answer": ',  # 2 malformed
        b'{"question": "caf\xe9 \xff?", "answer": "#### 1"}',  # 3 not UTF-8
        b'{"question": "lone \\ud800 surrogate?", "answer": "#### 2"}',  # 4 lone surrogate
        json.dumps({"question": "", "answer": "#### 3"}).encode(),  # 5 empty field
        json.dumps({"answer": "#### 3"}).encode(),  # 6 missing field
        json.dumps({"question": "What is 4 + 4?", "answer": "eight"}).encode(),  # 7 no ####
        json.dumps(
            {"question": "What  is 2 + 3?", "answer": "#### 5"}
        ).encode(),  # 8 duplicate question
        json.dumps({"question": "x" * 30_000 + "?", "answer": "#### 1"}).encode(),  # 9 too large
        b"[1, 2, 3]",  # 10 not an object
        b"",  # blank line: not a record
        json.dumps({"question": "What is 6 * 7?", "answer": "#### 42"}).encode(),  # 12 ok
    ]
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_broken_rows_are_accounted_row_by_row(broken_jsonl):
    result = ingest([SeedSource(kind="file", path=str(broken_jsonl), format="gsm8k")])
    assert result.read == 11 and result.accepted == 2 and result.rejected.height == 9
    by_line = {r["line"]: r["reason"] for r in result.rejected.iter_rows(named=True)}
    assert by_line == {
        2: "malformed_json",
        3: "not_utf8",
        4: "lone_surrogate",
        5: "missing_field",
        6: "missing_field",
        7: "no_final_answer",
        8: "duplicate_question",
        9: "too_large",
        10: "not_an_object",
    }
    assert set(result.rejected["file"]) == {str(broken_jsonl)}
    assert result.stats["duplicate_questions_collapsed"] == 1


def test_strict_fails_on_first_bad_row_naming_file_and_line(broken_jsonl):
    with pytest.raises(SeedError, match=rf"^{broken_jsonl}:2: malformed_json: "):
        ingest([SeedSource(kind="file", path=str(broken_jsonl), format="gsm8k")], strict=True)


def test_duplicate_ids_and_math_without_box(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [
        {
            "id": "a",
            "problem": "Find $x$ if $x+1=2$.",
            "solution": "$x=\\boxed{1}$",
            "level": "Level 1",
            "type": "Algebra",
        },
        {
            "id": "a",
            "problem": "Find $y$ if $y+1=3$.",
            "solution": "$y=\\boxed{2}$",
            "level": "Level 1",
            "type": "Algebra",
        },
        {
            "id": "b",
            "problem": "Find $z$.",
            "solution": "z is 3",
            "level": "Level 2",
            "type": "Algebra",
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = ingest([SeedSource(kind="math", path=str(path))])
    assert result.accepted == 1
    assert result.rejected["reason"].to_list() == ["duplicate_id", "no_final_answer"]
    assert "already used at" in result.rejected["detail"][0]


def test_empty_file_is_a_rejected_record(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    result = ingest([SeedSource(kind="file", path=str(path), format="gsm8k")])
    assert (result.read, result.accepted) == (1, 0)
    assert result.rejected.row(0, named=True)["reason"] == "empty_file"
    with pytest.raises(SeedError, match=r"empty\.jsonl:0: empty_file"):
        ingest([SeedSource(kind="file", path=str(path), format="gsm8k")], strict=True)


@pytest.mark.parametrize("suffix", ["json", "csv", "parquet"])
def test_generic_files_with_mapping(tmp_path, suffix):
    rows = [
        {"uid": "p1", "q": "What is 10 / 2?", "sol": "10/2 = 5\n#### 5", "lvl": "3"},
        {"uid": "p2", "q": "Compute $3^2$.", "sol": "$3^2 = \\boxed{9}$", "lvl": "Level 4"},
    ]
    path = tmp_path / f"seeds.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "csv":
        pl.DataFrame(rows).write_csv(path)
    else:
        pl.DataFrame(rows).write_parquet(path)
    source = SeedSource(
        kind="file",
        path=str(path),
        mapping={"question": "q", "solution": "sol", "id": "uid", "level": "lvl"},
        label="mine",
    )
    result = ingest([source])
    assert result.seeds.select("id", "answer", "level").rows() == [
        ("mine/p1", "5", 3),
        ("mine/p2", "9", 4),
    ]


def test_csv_with_invalid_utf8_is_rejected_by_line(tmp_path):
    path = tmp_path / "s.csv"
    path.write_bytes(b"question,answer\nWhat is 1+1?,2\nbad \xff bytes?,3\nWhat is 2+2?,4\n")
    result = ingest(
        [
            SeedSource(
                kind="file", path=str(path), mapping={"question": "question", "answer": "answer"}
            )
        ]
    )
    assert result.accepted == 2
    assert result.rejected.select("line", "reason").rows() == [(3, "not_utf8")]


def test_hub_source_offline_fails_with_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SeedError, match=r"^hf:openai/gsm8k: could not load split 'train'"):
        ingest([SeedSource(kind="hf", name="openai/gsm8k", config="main", format="gsm8k")])


def test_hub_source_reads_through_datasets(monkeypatch):
    """The real `datasets.load_dataset` path, pointed at an in-memory data set (no network here)."""
    import datasets

    data = datasets.Dataset.from_list([{"question": "What is 5 - 2?", "answer": "#### 3"}])
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return data

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    result = ingest([SeedSource(kind="hf", name="openai/gsm8k", config="main", format="gsm8k")])
    assert calls == [("openai/gsm8k", "main", "train")]
    assert result.seeds.select("source", "answer").rows() == [("openai/gsm8k", "3")]


def test_source_validation_messages():
    with pytest.raises(ValueError, match="needs a path"):
        SeedSource(kind="file", format="gsm8k")
    with pytest.raises(ValueError, match="unknown seed field"):
        SeedSource(kind="file", path="x.jsonl", mapping={"question": "q", "bogus": "b"})


def test_ingest_is_versioned_and_cached(evolforge_home, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"question": "What is 1+2?", "answer": "#### 3"}) + "\n")
    params = IngestParams(sources=[SeedSource(kind="file", path=str(path), format="gsm8k")])
    first = ingest_seeds.run(params=params)
    second = ingest_seeds.run(params=params)
    assert not first.cached and second.cached and first.refs == second.refs
    path.write_text(
        json.dumps({"question": "What is 1+3?", "answer": "#### 4"}) + "\n"
    )  # new content
    third = ingest_seeds.run(params=params)
    assert not third.cached and third.refs["seeds"] != first.refs["seeds"]


def test_limit_reads_only_the_first_rows():
    result = ingest([SeedSource(kind="sample", limit=6)])
    assert (result.read, result.accepted) == (6, 6)
    assert (
        result.seeds.filter(pl.col("level").is_null()).height == 3
    )  # the sample interleaves kinds


def test_a_folder_source_reads_every_seed_file_and_follows_new_ones(tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jsonl").write_text(
        json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n", encoding="utf-8"
    )
    (inbox / "notes.txt").write_text("not seeds", encoding="utf-8")
    monkeypatch.setenv("INBOX", str(inbox))
    source = SeedSource(kind="file", path="$INBOX", format="seed")
    first = ingest([source])
    assert first.stats["accepted"] == 1 and first.rejected.height == 0
    before = source.fingerprint()
    (inbox / "b.csv").write_text("question,answer\nWhat is 2 + 3?,5\n", encoding="utf-8")
    second = ingest([source])
    assert second.seeds["question"].to_list() == ["What is 1 + 1?", "What is 2 + 3?"]
    assert source.fingerprint() != before and set(source.fingerprint()["files"]) == {
        "a.jsonl",
        "b.csv",
    }
    limited = ingest([SeedSource(kind="file", path=str(inbox), format="seed", limit=1)])
    assert limited.stats["read"] == 1  # the limit counts across the folder's files


def test_a_source_is_identified_by_its_content_not_its_place(tmp_path, monkeypatch):
    """The same seeds at two places (a copied checkout, inbox or shared-data folder) are one
    source, and one `seeds` version; changed content is another."""
    import shutil

    import tasks.seeds as seeds_mod

    rows = json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n"
    first, second = tmp_path / "a" / "seeds.jsonl", tmp_path / "b" / "c" / "seeds.jsonl"
    for path in (first, second):
        path.parent.mkdir(parents=True)
        path.write_text(rows, encoding="utf-8")
    one, two = (SeedSource(kind="file", path=str(p), format="seed") for p in (first, second))
    assert one.fingerprint() == two.fingerprint()
    assert str(tmp_path) not in json.dumps(one.fingerprint())
    assert ingest_seeds.version(params=IngestParams(sources=[one])) == ingest_seeds.version(
        params=IngestParams(sources=[two])
    )
    folders = [SeedSource(kind="file", path=str(p.parent), format="seed") for p in (first, second)]
    assert folders[0].fingerprint() == folders[1].fingerprint()
    second.write_text(rows.replace("1 + 1", "1 + 2"), encoding="utf-8")
    assert one.fingerprint() != two.fingerprint()
    assert folders[0].fingerprint() != folders[1].fingerprint()

    # The built-in sample in another checkout; the train sets in another shared-data folder.
    before = IngestParams().fingerprint()
    copy = tmp_path / "checkout" / "sample_seeds.jsonl"
    copy.parent.mkdir()
    shutil.copy(seeds_mod.SAMPLE_PATH, copy)
    monkeypatch.setattr(seeds_mod, "SAMPLE_PATH", copy)
    assert IngestParams().fingerprint() == before
    copy.write_text(rows, encoding="utf-8")
    assert IngestParams().fingerprint() != before
    for place in ("x", "y"):
        (tmp_path / place / "gsm8k").mkdir(parents=True)
        (tmp_path / place / "gsm8k" / "train.jsonl").write_text(rows, encoding="utf-8")
    monkeypatch.setenv("EVOLFORGE_SHARED_DATA", str(tmp_path / "x"))
    gsm8k = SeedSource(kind="gsm8k").fingerprint()
    monkeypatch.setenv("EVOLFORGE_SHARED_DATA", str(tmp_path / "y"))
    assert SeedSource(kind="gsm8k").fingerprint() == gsm8k
