"""DAPO's soft overlong penalty: a length-aware punishment instead of a cliff at the token limit."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OverlongConfig(BaseModel):
    """Lengths (in completion tokens) of the soft overlong penalty."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    l_max: int = Field(..., ge=1, description="length at which the penalty reaches -1 (the generation limit)")
    l_cache: int = Field(..., ge=1, description="width of the linear ramp that ends at l_max")

    @model_validator(mode="after")
    def _ramp_fits(self) -> OverlongConfig:
        if self.l_cache > self.l_max:
            raise ValueError(f"overlong.l_cache ({self.l_cache}) must be <= overlong.l_max ({self.l_max})")
        return self


def overlong_penalty(num_tokens: int, *, l_max: int, l_cache: int) -> float:
    """Range [-1, 0]: 0 up to l_max - l_cache tokens, then linear down to -1 at l_max (and beyond)."""
    start = l_max - l_cache
    if num_tokens <= start:
        return 0.0
    if num_tokens >= l_max:
        return -1.0
    return (start - num_tokens) / l_cache
