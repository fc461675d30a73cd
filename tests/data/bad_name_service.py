"""A service whose name is not `group.function`: publishing it fails with one line naming it."""
from __future__ import annotations

from pydantic import BaseModel

from microcores import MicroCore


class SquareIn(BaseModel):
    n: int


class SquareOut(BaseModel):
    square: int


class SquareIt(MicroCore[SquareIn, SquareOut]):
    name = "SquareIt"

    def process(self, data: SquareIn) -> SquareOut:
        return SquareOut(square=data.n * data.n)
