"""The records of evaluation (see `tasks.records`): what `eval_contamination`,
`eval_requests`, `evaluate` and `eval_scores` write (the items are `tasks.records.BenchmarkItem`),
and two frames that are not datasets."""

import polars as pl

from tasks.records import Record


class Contamination(Record):
    """Whether one benchmark item is in one model's training sets (`eval_contamination`)."""

    model: pl.String
    benchmark: pl.String
    item_id: pl.String
    contaminated: pl.Boolean  # null: the model's training sets are unknown (or not checked)
    training_set: pl.String  # the closest flagged training row, when contaminated
    training_id: pl.String
    similarity: pl.Float64
    detail: pl.String
    matches: pl.Int64  # flagged training rows that hold this item


class TrainingOverlap(Record):
    """Intermediate (not a dataset): one training row that holds an evaluated item."""

    training_set: pl.String
    training_id: pl.String
    benchmark: pl.String
    item_id: pl.String
    similarity: pl.Float64
    detail: pl.String


class EvalRequest(Record):
    """One planned request: model x benchmark item x decoding mode (`eval_requests`)."""

    id: pl.String  # model|benchmark|item|mode
    model: pl.String
    # Never a path (a version must not depend on where a home or a folder lives):
    model_ref: pl.String  # a checkpoint's name@version, a folder's identity, a hub/served name
    engine_model: (
        pl.String
    )  # a hub id or served name; null: the engine's own, a checkpoint, a folder
    model_identity: pl.String
    prompt_format: pl.String
    benchmark: pl.String
    item_id: pl.String
    mode: pl.String  # cot | pot | hybrid | maj@<k>
    samples: pl.Int64
    question: pl.String
    answer: pl.String
    choices: pl.List(pl.String)


class EvalResult(Record):
    """One answered and graded request (`eval_results`)."""

    id: pl.String
    model: pl.String
    model_ref: pl.String
    engine_identity: pl.String
    benchmark: pl.String
    item_id: pl.String
    mode: pl.String
    prompt_format: pl.String
    prompt_version: pl.String  # template version of `completion`
    completion: pl.String  # the first request's text: the CoT, the PoT, maj's winning sample
    finish_reason: pl.String
    program: pl.String
    program_output: pl.String
    program_error: pl.String  # why the program gave no answer
    fallback: pl.Boolean  # hybrid: whether the CoT answer was used (null in other modes)
    fallback_completion: pl.String
    fallback_prompt_version: pl.String
    raw_answer: pl.String  # multiple choice: the answer before it was mapped to an option
    extracted_answer: pl.String  # the graded answer (an option letter for choices)
    samples: pl.List(pl.String)  # maj@k: every sample's answer
    agreement: pl.Float64  # maj@k: winning group size / k
    reference: pl.String
    correct: pl.Boolean  # null: could not be judged (engine error, checker timeout)
    prompt_tokens: pl.Int64
    completion_tokens: pl.Int64
    error: pl.String


class EvalScore(Record):
    """Accuracy of one model x benchmark x mode (`eval_scores`)."""

    model: pl.String
    model_ref: pl.String
    benchmark: pl.String
    mode: pl.String
    prompt_format: pl.String
    n: pl.Int64
    judged: pl.Int64
    correct: pl.Int64
    accuracy: pl.Float64  # correct / judged; null when nothing was judged
    ci_low: pl.Float64  # Wilson 95% interval
    ci_high: pl.Float64
    no_answer: pl.Int64
    truncated: pl.Int64
    errors: pl.Int64
    fallback_rate: pl.Float64
    mean_completion_tokens: pl.Float64
    contaminated: pl.Int64  # flagged items; null when no model's training sets were checked
    accuracy_clean: pl.Float64  # accuracy over the items not flagged


class GraderCheck(Record):
    """Not a dataset: one benchmark item's reference solution graded against its own answer
    (`grader_check.check_references`)."""

    benchmark: pl.String
    id: pl.String
    subject: pl.String
    style: pl.String
    derived: pl.String  # the answer the reference solution gives
    answer: pl.String  # the normalised reference answer
    correct: pl.Boolean
    explanation: pl.String  # why a known exception fails (null for a pass or an unknown one)
