"""Evaluation of the models the factory trains (and any other): benchmarks × decoding modes.

- `models.py`: what a model spec names (the embedded base, a local folder, a checkpoint in the
  `models` view, a served model) and the training sets its lineage leads to.
- `items.py`: the `eval_items` stage (benchmark items, a seeded subset).
- `guard.py`: the `eval_contamination` stage (benchmark items found in a model's training sets).
- `evaluate.py`: the `eval_requests` plan and the `evaluate` stage (cot, pot, hybrid, maj@k).
- `scores.py`: the `eval_scores` stage (accuracy, Wilson 95% intervals) and the chart.
- `grader_check.py`: each benchmark's reference solutions graded against its own answers.

Run: `evolforge eval --model base --model sft_model --benchmarks gsm8k,math500 --modes cot,hybrid
--limit 200` (the flow is `flows/evaluation.py`; the comparison table, its Prefect artifacts
and the CLI summary are in `flows/reports/evaluation.py`).
"""
