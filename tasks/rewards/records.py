"""The records of reward labelling (see `tasks.records`): what the stages of the rewards flow
write, and the ProcessBench-like items of the quality check."""

import polars as pl

from tasks.records import Record

# One sibling's scores from one judge call, in presentation order.
ORDER_SCORE = pl.Struct(
    {
        "id": pl.String,
        "definition": pl.Int64,
        "precision": pl.Int64,
        "integrity": pl.Int64,
        "reason": pl.String,
    }
)
# One sibling's scores averaged over both orders, with its instruction rewards.
SIBLING_SCORE = pl.Struct(
    {
        "id": pl.String,
        "source": pl.String,
        "definition": pl.Float64,
        "precision": pl.Float64,
        "integrity": pl.Float64,
        "score": pl.Float64,
        "r_i": pl.Float64,
        "r_i_sibling": pl.Float64,
    }
)


class Sibling(Record):
    """One instruction of a sibling group (`siblings`): an evolution of the group's parent,
    from the data flow or from an evolver."""

    group_id: pl.String  # <parent_id>@<round>
    parent_id: pl.String
    round: pl.Int64
    id: pl.String
    root_id: pl.String
    source: pl.String  # instructions | evolver
    evolver: pl.Int64  # index into the evolver list; null for the data flow's evolutions
    direction: pl.String
    op: pl.String
    model: pl.String
    template_version: pl.String
    text: pl.String  # null when the evolver's reply could not be parsed
    finish_reason: pl.String
    error: pl.String


class InstructionRanking(Record):
    """The judge's ranking of one sibling group (`instruction_rankings`), in two orders."""

    group_id: pl.String
    parent_id: pl.String
    round: pl.Int64
    n_siblings: pl.Int64  # siblings shown to the judge
    sibling_ids: pl.List(pl.String)  # best first; null when no order was judged
    scores: pl.List(SIBLING_SCORE)  # in rank order; null when no order was judged
    order_a: pl.List(pl.String)  # the seeded presentation order
    order_b: pl.List(pl.String)  # its reverse, or a second seeded permutation
    scores_a: pl.List(ORDER_SCORE)  # in presentation order; null when that call failed
    scores_b: pl.List(ORDER_SCORE)
    ranking_a: pl.List(pl.String)  # best first by order a's scores alone
    ranking_b: pl.List(pl.String)
    tau: pl.Float64
    n_pairs: pl.Int64
    n_consistent: pl.Int64
    error_a: pl.String
    error_b: pl.String
    unrankable: pl.List(pl.String)  # sibling ids without text
    judge_model: pl.String
    template_version: pl.String


class IrmPair(Record):
    """One preference pair of siblings for the IRM (`irm_pairs`)."""

    id: pl.String  # <chosen_id>><rejected_id>
    parent_id: pl.String
    round: pl.Int64
    prompt: pl.String  # the parent instruction
    chosen: pl.String
    rejected: pl.String
    chosen_id: pl.String
    rejected_id: pl.String
    chosen_score: pl.Float64
    rejected_score: pl.Float64
    margin: pl.Float64  # chosen_score - rejected_score > 0
    consistent: pl.Boolean


class SegmentedSolution(Record):
    """One solution selected for step labels (`segmented_solutions`), CoT ones cut into steps."""

    solution_id: pl.String
    instruction_id: pl.String
    round: pl.Int64
    kind: pl.String  # cot | pot_fallback_cot | pot
    problem: pl.String
    text: pl.String
    steps: pl.List(pl.String)  # null for pot
    n_steps: pl.Int64
    extracted_answer: pl.String
    program: pl.String
    program_error: pl.String
    target: pl.String  # the answer to reach; null when the instruction is unverified
    target_source: pl.String  # reference | majority | null


class StepJudgment(Record):
    """The judge's verdict on one CoT solution's steps (`step_judgments`)."""

    solution_id: pl.String
    n_steps: pl.Int64
    judged: pl.Boolean  # false: the judge failed, every label of the solution is null
    first_error: pl.Int64  # index of the first incorrect step; null = none (when judged)
    reason: pl.String
    error: pl.String
    judge_model: pl.String
    template_version: pl.String


class StepRollout(Record):
    """The Monte Carlo estimate of one step of a CoT solution (`step_rollouts`)."""

    solution_id: pl.String
    step_index: pl.Int64
    source: pl.String  # rollouts | final_answer | skipped
    n_rollouts: pl.Int64  # completions asked for
    n_judged: pl.Int64  # completions with a verdict (failed requests, unjudged answers out)
    n_correct: pl.Int64
    mc_soft: pl.Float64
    mc_hard: pl.Boolean
    note: pl.String


class StepLabel(Record):
    """One step label (`step_labels`): a CoT step, or a PoT solution's execution outcome."""

    solution_id: pl.String
    instruction_id: pl.String
    round: pl.Int64
    kind: pl.String
    label_source: pl.String  # steps | execution
    step_index: pl.Int64
    step_text: pl.String
    judge: pl.Boolean
    mc_soft: pl.Float64
    mc_hard: pl.Boolean
    consensus: pl.Boolean  # judge and Monte Carlo agreed (PoT: the execution outcome); else null
    note: pl.String


class Reward(Record):
    """r = rI · rA of one solution (`rewards`)."""

    instruction_id: pl.String
    solution_id: pl.String
    round: pl.Int64
    kind: pl.String
    r_i: pl.Float64  # instruction reward in [0, 1], one scale for all groups
    r_i_sibling: pl.Float64  # normalised within the parent's siblings
    r_a: pl.Float64  # answer reward in [0, 1] from the step labels
    r: pl.Float64  # r_i * r_a; null when either is null
    r_i_note: pl.String
    r_a_note: pl.String


class ProcessBenchItem(Record):
    """Intermediate (not a dataset): one item of the ProcessBench-like quality check."""

    id: pl.String
    problem: pl.String
    steps: pl.List(pl.String)
    answer: pl.String
    label: pl.Int64  # index of the first wrong step; null = no error
