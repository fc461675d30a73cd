"""Services that fail in the ways tests/test_errors_where.py looks at: an exception deep in a helper,
an output that breaks its model, strict and lenient input models."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from microcores import MicroCore


class RatioIn(BaseModel):
    n: int
    d: int = 0


class RatioOut(BaseModel):
    ratio: float


def _scale(n: int, d: int) -> float:
    return n / d  # ZeroDivisionError when d is 0: the line the details must name


def _ratio(n: int, d: int) -> float:
    return _scale(n, d) * 1.0


class Ratio(MicroCore[RatioIn, RatioOut]):
    """n / d, through two helpers (fails for d = 0)."""

    name = "fail.ratio"

    def process(self, data: RatioIn) -> RatioOut:
        return RatioOut(ratio=_ratio(data.n, data.d))


class TotalIn(BaseModel):
    n: int


class TotalOut(BaseModel):
    total: int
    label: str


class BadTotal(MicroCore[TotalIn, TotalOut]):
    """Returns an output without `label` (n > 0) or with a `total` that is not a number (n <= 0)."""

    name = "fail.bad_total"

    def process(self, data: TotalIn) -> TotalOut:
        if data.n > 0:
            return {"total": data.n}  # type: ignore[return-value]
        return {"total": "lots", "label": "x"}  # type: ignore[return-value]


class LooseIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    n: int


class LooseOut(BaseModel):
    n: int
    extras: list[str]


class Loose(MicroCore[LooseIn, LooseOut]):
    """Takes fields it does not declare (its model allows extras) and names them."""

    name = "fail.loose"

    def process(self, data: LooseIn) -> LooseOut:
        return LooseOut(n=data.n, extras=sorted((data.model_extra or {}).keys()))
