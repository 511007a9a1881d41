"""The run summary printed by `evolforge run`: what was produced and how to query it."""

from __future__ import annotations

from typing import Any

from infra.settings import home


def render_summary(summary: dict[str, Any]) -> str:
    lines = ["", "== evolforge run summary =="]
    seeds = summary.get("seeds")
    if seeds:
        stats = seeds["stats"]
        state = "cache hit" if seeds["cached"] else "new"
        lines.append(
            f"seeds: {seeds['refs']['seeds']} ({state}) read {stats['read']} = accepted {stats['accepted']}"
            f" + rejected {stats['rejected']}"
        )
    lines += [
        "",
        f"results: {home() / 'datasets'}",
        f"catalog: {home() / 'catalog.duckdb'}",
        'query:   evolforge sql "SELECT * FROM seeds LIMIT 5"',
        "         evolforge datasets ls",
        f"         duckdb -readonly {home() / 'catalog.duckdb'}",
    ]
    return "\n".join(lines)
