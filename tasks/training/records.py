"""The records of the training sets (see `tasks.records`): what `sft_set`, `irm_set`,
`prm_steps` and `rl_prompts` write, each row with its held-out `split`."""

import polars as pl

from tasks.records import Record


class SftExample(Record):
    """One SFT example (`sft_set`): an Alpaca prompt and a verified rationale."""

    id: pl.String  # <instruction_id>:<kind>
    instruction_id: pl.String
    root_id: pl.String
    round: pl.Int64
    source: pl.String  # sft_answer (a seed's SFT answer) | solution (a voted solution)
    kind: pl.String  # cot | pot
    solution_id: pl.String  # null for SFT answers
    prompt: pl.String
    completion: pl.String
    answer: pl.String
    split: pl.String  # train | test


class IrmExample(Record):
    """One IRM preference pair with its prompt rendered (`irm_set`)."""

    id: pl.String
    parent_id: pl.String
    root_id: pl.String
    round: pl.Int64
    parent: pl.String  # the parent instruction's text (irm_pairs.prompt)
    prompt: pl.String  # formats.irm_prompt(parent): what the IRM reads before an evolution
    chosen: pl.String
    rejected: pl.String
    chosen_id: pl.String
    rejected_id: pl.String
    margin: pl.Float64
    consistent: pl.Boolean
    split: pl.String


class PrmExample(Record):
    """One labelled solution in trl's stepwise-supervision layout (`prm_steps`)."""

    id: pl.String  # the solution id
    instruction_id: pl.String
    root_id: pl.String
    round: pl.Int64
    kind: pl.String  # cot | pot_fallback_cot | pot
    prompt: pl.String
    completions: pl.List(pl.String)  # the steps, in order
    labels: pl.List(pl.Boolean)  # true = correct step; null = not judged
    first_error: pl.Int64  # index of the first step labelled false; null = none
    n_steps: pl.Int64
    labeller: pl.String
    split: pl.String


class RlPrompt(Record):
    """One RL prompt with its label (`rl_prompts`)."""

    id: pl.String  # the instruction id
    root_id: pl.String
    round: pl.Int64
    prompt: pl.String
    instruction: pl.String
    parent: pl.String  # the parent instruction's text; null for seeds
    label: pl.String  # the reference answer (seeds) or the verified majority answer
    label_source: pl.String  # reference | majority
    r_i: pl.Float64  # the judge's instruction reward (rewards dataset); null when absent
    split: pl.String
