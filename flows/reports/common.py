"""What every flow's report shares: the per-stage lines (runs computed vs cache hits, new shards,
engine work) of a flow's steps. (A dataset a state names is read with `tasks.stage.read`.)"""

from __future__ import annotations

from collections.abc import Sequence

from flows.state import Step


def stage_lines(steps: Sequence[Step]) -> list[str]:
    """Per stage (summed over rounds): runs computed vs cache hits, new shards, engine work."""
    totals: dict[str, dict[str, float]] = {}
    for step in steps:
        acc = totals.setdefault(step.stage, {})
        acc["runs"] = acc.get("runs", 0) + 1
        acc["cached"] = acc.get("cached", 0) + (1 if step.cached else 0)
        shards = step.stats.get("shards") or {}
        if not step.cached:
            acc["shards"] = acc.get("shards", 0) + shards.get("total", 0)
            acc["new_shards"] = acc.get("new_shards", 0) + shards.get("new", 0)
            for k, v in (step.stats.get("engine") or {}).items():
                acc[k] = acc.get(k, 0) + v
    lines = []
    for name, acc in totals.items():
        line = f"  {name:<12} {int(acc['runs'] - acc['cached'])} computed / {int(acc['cached'])} cached"
        if acc.get("shards"):
            line += f"; shards {int(acc['new_shards'])} new of {int(acc['shards'])}"
        if acc.get("requests"):
            line += (
                f"; requests {int(acc['requests'])}: hits {int(acc.get('hits', 0))} / misses "
                f"{int(acc.get('misses', 0))} / failures {int(acc.get('failures', 0))}; tokens in "
                f"{int(acc.get('prompt_tokens', 0))}, out {int(acc.get('completion_tokens', 0))}; "
                f"engine {acc.get('engine_seconds', 0):.1f} s"
            )
        lines.append(line)
    return lines
