"""The data flow's report rendered from typed state: summary text, stage lines, markdown."""

from __future__ import annotations

import polars as pl

from flows.reports.common import stage_lines
from flows.reports.data import data_report_markdown, render_summary, round_line
from flows.state import DataState, Step
from storage.datasets import DatasetStore
from tasks.evolution.records import FunnelCounts


def _state(home) -> DataState:
    store = DatasetStore(home)

    def put(name, frame):
        return store.write(name, frame, stage="t", code_version="t", params={}).ref

    funnel = pl.DataFrame(
        [
            {
                "round": 1,
                "direction": "upward",
                "op": "concretize",
                "generated": 4,
                "eliminated": 1,
                "duplicate": 1,
                "contaminated": 0,
                "kept": 2,
                "eliminated_by_rule": "no_question: 1",
            }
        ],
        schema=FunnelCounts.schema(),
    )
    difficulty = pl.DataFrame(
        {
            "round": [1],
            "direction": ["upward"],
            "n_evolutions": [2],
            "n_pairs": [2],
            "mean_difficulty": [0.5],
            "mean_parent_difficulty": [0.25],
            "mean_delta": [0.25],
        }
    )
    answers = pl.DataFrame(
        {"instruction_id": ["a", "b"], "agreement": [1.0, 0.5], "verified": [True, False]}
    )
    steps = [
        Step(
            stage="ingest",
            version="v1",
            cached=True,
            stats={"read": 3, "accepted": 3, "rejected": 0},
        ),
        Step(
            stage="evolve",
            round=1,
            version="v2",
            cached=False,
            stats={
                "shards": {"total": 3, "new": 1, "reused": 2},
                "engine": {"requests": 10, "hits": 6, "misses": 4, "completion_tokens": 80},
            },
        ),
        Step(stage="evolve", round=2, version="v3", cached=True, stats={}),
    ]
    return DataState(
        seeds=put("seeds", pl.DataFrame({"id": ["s"]})),
        funnel=put("funnel", funnel),
        difficulty=put("difficulty", difficulty),
        answers=put("answers", answers),
        steps=steps,
    )


def test_summary_shows_funnel_difficulty_answers_and_stage_work(evolforge_home):
    text = render_summary(_state(evolforge_home))
    assert "seeds: seeds@" in text and "(cache hit) read 3 = accepted 3 + rejected 0" in text
    assert "answers: 2 instructions, 1 verified, mean agreement 0.750" in text
    assert "round 1 upward    n=2    difficulty 0.500 vs parents 0.250 (delta +0.250)" in text
    assert 'evolforge sql "SELECT round, direction, op, text FROM instructions LIMIT 5"' in text


def test_stage_lines_sum_runs_shards_and_engine_work(evolforge_home):
    lines = stage_lines(_state(evolforge_home).steps)
    assert lines[0].split() == ["ingest", "0", "computed", "/", "1", "cached"]
    assert "evolve       1 computed / 1 cached; shards 1 new of 3" in lines[1]
    assert "requests 10: hits 6 / misses 4" in lines[1]


def test_report_markdown_lists_stages_and_datasets(evolforge_home):
    markdown = data_report_markdown(_state(evolforge_home))
    assert "## Evolution funnel" in markdown and "| concretize |" in markdown
    assert "| evolve | 1 | computed (1 of 3 shards new) |" in markdown
    assert "| evolve | 2 | cache hit |" in markdown
    assert "- `funnel`: `funnel@" in markdown


def test_round_line():
    stats = {
        "generated": 8,
        "eliminated": 3,
        "duplicate": 1,
        "contaminated": 0,
        "kept": 4,
        "pool": 8,
    }
    assert round_line(2, stats) == (
        "round 2: generated 8 → eliminated 3, duplicate 1, contaminated 0 → kept 4 (pool 8)"
    )
