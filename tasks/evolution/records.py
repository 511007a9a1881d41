"""The records of the evolution rounds (see `tasks.records`): what `evolve`, `eliminate`,
`dedup`, `start_pool` and `combine` write, and two intermediate frames of dedup."""

import polars as pl

from tasks.records import Record


class Instruction(Record):
    """One instruction (`instructions`, `pool`): a seed (round 0) or a kept evolution."""

    id: pl.String
    parent_id: pl.String  # null for seeds
    root_id: pl.String  # the seed the lineage starts from
    round: pl.Int64
    direction: pl.String  # upward | downward | seed
    op: pl.String  # the evolution operation; "seed" for seeds
    template_version: pl.String  # the evolve prompt's content hash; "" for seeds
    model: pl.String  # the evolver's identity; the seed source for seeds
    text: pl.String  # the problem; null for an evolution whose output could not be parsed


class Evolution(Instruction):
    """One draw of the evolver (`evolutions`), unparseable ones too."""

    raw: pl.String  # the completion as the model wrote it; null when the request failed
    finish_reason: pl.String  # stop | length | error
    error: pl.String  # the engine's error for a failed request, else null


class Eliminated(Record):
    """One evolution the eliminator dropped (`elimination`), with the rule and what it saw."""

    id: pl.String
    parent_id: pl.String
    root_id: pl.String
    round: pl.Int64
    direction: pl.String
    op: pl.String
    text: pl.String
    rule: pl.String
    evidence: pl.String


class EliminationCheck(Record):
    """The eliminator's checks of one evolution (`elimination_checks`), kept or not."""

    id: pl.String
    rule: pl.String  # the rule that dropped the instruction, null when kept
    probe_answer: pl.String  # the engine's answer to the evolved problem
    probe_finish_reason: pl.String
    equal_verdict: pl.String  # Equal | Not Equal, null when not judged or the judge failed
    solvable: pl.Boolean
    solvable_reason: pl.String
    notes: pl.String  # engine or judge failures that did not drop the instruction
    irm_score: pl.Float64  # the trained IRM's score (Active Evol-Instruct), null when not scored


class DedupMatch(Record):
    """Intermediate (not a dataset): one rule's decision on a candidate, as the dedup and
    decontamination SQL returns it."""

    id: pl.String
    rule: pl.String  # exact_duplicate | near_duplicate | contaminated_ngram | ...embedding
    collided_with: pl.String  # the earlier instruction or the benchmark item it matched
    similarity: pl.Float64
    detail: pl.String


class EmbeddingMatch(Record):
    """Intermediate (not a dataset): a candidate whose embedding is close to a benchmark item."""

    id: pl.String
    collided_with: pl.String
    similarity: pl.Float64  # cosine similarity


class DedupRemoved(Instruction):
    """One candidate that dedup or decontamination removed (`dedup`): the candidate's
    instruction columns and the rule's decision."""

    rule: pl.String
    collided_with: pl.String
    similarity: pl.Float64
    detail: pl.String


class Removed(Eliminated):
    """One removal of any round (`eliminated`, cumulative): an elimination or a dedup rule."""

    stage: pl.String  # elimination | dedup
    collided_with: pl.String  # dedup: the instruction or benchmark item it matched
    similarity: pl.Float64


class FunnelCounts(Record):
    """The funnel of one (round, direction, op) (`funnel`, cumulative): generated =
    eliminated + duplicate + contaminated + kept."""

    round: pl.Int64
    direction: pl.String
    op: pl.String
    generated: pl.Int64
    eliminated: pl.Int64
    duplicate: pl.Int64
    contaminated: pl.Int64
    kept: pl.Int64
    eliminated_by_rule: pl.String  # "rule=n, ..." of the elimination rules; "" when none
