"""How a stage samples from its engine: one `Sampling` model for every parameter model.

Each use (the evolver, the probe, the judges, the solutions, ...) has its own defaults, made by
`Sampling.defaults(...)`: a subclass whose fields keep the constraints and descriptions and
change only their defaults. A profile that sets one key (`evolution: {sampling: {max_tokens:
128}}`) keeps that use's other defaults, not those of the base model; so does a `Sampling` built
by hand (`EvolutionParams(sampling=Sampling(max_tokens=64))`), whose unset fields are left out.

`engine_params` builds the engine's `SamplingParams`: the one place a parameter model becomes a
request's sampling.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.fields import FieldInfo

from infra.engines.base import SamplingParams


class Sampling(BaseModel):
    """Temperature, nucleus and token limit of a completion."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    max_tokens: int = Field(256, ge=1, description="token limit of a completion")

    @model_validator(mode="before")
    @classmethod
    def _only_what_was_set(cls, data: Any) -> Any:
        """A `Sampling` of another use (or the base model) gives only the fields set on it,
        so this use's defaults fill the rest."""
        if isinstance(data, Sampling) and not isinstance(data, cls):
            return data.model_dump(exclude_unset=True)
        return data

    @classmethod
    def defaults(cls, name: str, doc: str, **defaults: Any) -> type[Sampling]:
        """A `Sampling` with other defaults, for one use; `name` is a module-level name of the
        calling module (so instances pickle)."""
        unknown = set(defaults) - set(cls.model_fields)
        if unknown:
            raise TypeError(f"Sampling has no field(s) {', '.join(sorted(unknown))}")
        fields = {
            key: (
                cls.model_fields[key].annotation,
                FieldInfo.merge_field_infos(cls.model_fields[key], default=value),
            )
            for key, value in defaults.items()
        }
        module = sys._getframe(1).f_globals.get("__name__", __name__)
        return create_model(name, __base__=cls, __module__=module, __doc__=doc, **fields)

    def engine_params(self, seed: int = 0, n: int = 1, stop: Sequence[str] = ()) -> SamplingParams:
        """The engine's sampling of a request; `seed`, `n` and `stop` belong to the request."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            n=n,
            seed=seed,
            stop=tuple(stop),
        )
