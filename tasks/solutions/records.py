"""The records of the solutions (see `tasks.records`): what `sft_answers`, `solve` and
`difficulty` write, and the two frames `solve` builds them from."""

import polars as pl

from tasks.records import Record


class SftAnswer(Record):
    """One seed re-solved step by step (`sft_answers`): the first sample that matched its
    reference answer, or why none did."""

    seed_id: pl.String
    solution: pl.String  # the kept sample; null when none matched
    predicted: pl.String  # the kept or last extracted answer
    correct: pl.Boolean
    tries: pl.Int64  # samples drawn for this seed
    reason: pl.String  # correct | wrong_answer | no_answer | unjudged | engine_error | ...
    model: pl.String
    template_version: pl.String


class SampledSolution(Record):
    """Intermediate (not a dataset): one sampled CoT or PoT solution of an instruction, before
    the vote (`write_solutions`)."""

    id: pl.String  # <instruction_id>:<sample>, the solution's id in rewards and step labels
    instruction_id: pl.String
    kind: pl.String  # cot | pot | pot_fallback_cot
    sample: pl.Int64
    text: pl.String
    program: pl.String
    program_stdout: pl.String
    program_error: pl.String
    extracted_answer: pl.String
    finish_reason: pl.String
    model: pl.String
    template_version: pl.String


class Solution(SampledSolution):
    """One sampled solution with its vote (`solutions`)."""

    verdict: pl.Boolean  # in the majority group; null when the instruction has no majority


class VotedAnswer(Record):
    """Intermediate (not a dataset): the majority answer of one instruction's solutions
    (`vote_answers`)."""

    instruction_id: pl.String
    answer: pl.String
    agreement: pl.Float64  # majority group / samples, unanswered samples included
    n_samples: pl.Int64
    n_answered: pl.Int64
    group_sizes: pl.List(pl.Int64)
    cot_answer: pl.String
    pot_answer: pl.String
    cot_pot_agreement: pl.Boolean  # null unless both a CoT and a PoT majority exist
    difficulty: pl.Float64  # 1 - agreement
    verified: pl.Boolean
    reference_match: pl.Boolean  # null without a reference (or when it could not be judged)


class Answer(VotedAnswer):
    """One instruction's pseudo-label (`answers`)."""

    round: pl.Int64


class Difficulty(Record):
    """Evolutions vs their parents in one (round, direction) (`difficulty`)."""

    round: pl.Int64
    direction: pl.String
    n_evolutions: pl.Int64
    n_pairs: pl.Int64  # evolutions whose parent has a difficulty too
    mean_difficulty: pl.Float64
    mean_parent_difficulty: pl.Float64
    mean_delta: pl.Float64  # paired: evolution minus parent
