"""Small pieces the reward labellers share: the judge's JSON reply, seeded choices, Kendall tau.

Judge replies are requested under a JSON schema (`ChatRequest.json_schema`); engines that cannot
constrain decoding may still wrap the object in prose or a code fence, which is tolerated here.
A reply that holds no usable object raises `JudgeError`: the labellers record the message and
leave the label null (could not judge), never a made-up value.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

from infra.engines.base import ChatResponse


class JudgeError(ValueError):
    """The judge's reply is not the requested JSON (or the request failed)."""


def reply_text(response: ChatResponse) -> str:
    """The first completion's text; JudgeError for a failed request."""
    if not response.ok or not response.completions:
        raise JudgeError(f"engine error: {response.error or 'no completion'}")
    return response.completions[0].text


def json_object(reply: str) -> dict[str, Any]:
    """The first JSON object in `reply` (the whole reply, or one embedded in text)."""
    text = reply.strip()
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise JudgeError(f"no JSON object in judge reply: {clip(reply, 120)!r}")


def clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def stable_int(*parts: object, bits: int = 63) -> int:
    """A deterministic non-negative integer from the parts (seeds, ids): no process salt."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - bits)


def unit_draw(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (a seeded coin for sampling shares)."""
    return stable_int(*parts, bits=53) / float(1 << 53)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b between two score lists over the same items (ties handled).

    None when it is undefined: fewer than two items, or one list is all ties.
    """
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: {len(x)} vs {len(y)} scores")
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    if n < 2 or denominator == 0:
        return None
    return (concordant - discordant) / denominator
