"""Reward labelling (WizardMath RLEIF): instruction rankings for the IRM, step labels for the PRM,
and r = rI · rA per solution.

Instruction side: `siblings` (k evolutions per sampled parent from one or more evolvers, next
to the data flow's own evolutions of that parent) → `rankings` (one listwise judge call per
parent in each of two seeded orders: per-criterion scores, Kendall tau between the orders, IRM
preference pairs marked consistent or not).

Answer side: `segment` (which solutions get step labels, their steps and the answer to reach)
→ `step_judge` (first incorrect step, ProcessBench's protocol) and `monte_carlo` (Math-Shepherd
rollouts from every step prefix) → `consensus` (step labels kept where both agree; PoT
solutions get their execution outcome) → `scores` (rI, rA, r). `functions` holds the trl reward
function; `processbench` the project's ProcessBench-like check; `steps` the segmenter.
"""
