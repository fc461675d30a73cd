"""The built-in services, published by every coordinator at start.

They follow the paper's examples (LibraryMath, MasterOfNumbers, UniverseOfSuperMath) plus three
demo services for load, failover and payload tests. This module ships to agents as a standalone
package, so it imports only the public SDK.
"""
from __future__ import annotations

import hashlib
import math
import operator
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from microcores import MicroCore


class ComputeIn(BaseModel):
    a: float
    b: float
    op: Literal["add", "sub", "mul", "div"] = "add"


class ComputeOut(BaseModel):
    result: float


_OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}


class Compute(MicroCore[ComputeIn, ComputeOut]):
    """Two numbers and an operation (the paper's LibraryMath)."""

    name = "math.compute"
    version = "1"
    pure = True
    idempotent = True
    timeout = 10.0

    def process(self, data: ComputeIn) -> ComputeOut:
        from microcores import InvalidInput

        if data.op == "div" and data.b == 0:
            raise InvalidInput("b must not be 0 when op is div", field="b")
        result = _OPS[data.op](data.a, data.b)
        if not math.isfinite(result):
            raise InvalidInput(f"the result of {data.op} overflows a 64-bit float", field="a")
        return ComputeOut(result=result)


class IsPositiveIn(BaseModel):
    n: float


class IsPositiveOut(BaseModel):
    n: float
    positive: bool


class IsPositive(MicroCore[IsPositiveIn, IsPositiveOut]):
    """Whether a number is positive (the paper's MasterOfNumbers)."""

    name = "numbers.is_positive"
    version = "1"
    pure = True
    idempotent = True
    timeout = 10.0

    def process(self, data: IsPositiveIn) -> IsPositiveOut:
        return IsPositiveOut(n=data.n, positive=data.n > 0)


class ClassifyOut(BaseModel):
    result: float
    positive: bool


class ComputeAndClassify(MicroCore[ComputeIn, ClassifyOut]):
    """Computes, then classifies the result, through two nested calls (UniverseOfSuperMath)."""

    name = "math.compute_and_classify"
    version = "1"
    pure = True
    idempotent = True
    timeout = 20.0

    def process(self, data: ComputeIn) -> ClassifyOut:
        computed = self.call(Compute, data)
        classified = self.call(IsPositive, IsPositiveIn(n=computed.result))
        return ClassifyOut(result=computed.result, positive=classified.positive)


class BurnIn(BaseModel):
    rounds: int = Field(default=100_000, ge=0, le=50_000_000, description="sha256 rounds to compute")


class BurnOut(BaseModel):
    rounds: int
    digest: str


class CpuBurn(MicroCore[BurnIn, BurnOut]):
    """CPU-heavy work whose cost is set by its input."""

    name = "demo.cpu_burn"
    version = "1"
    pure = True
    idempotent = True
    timeout = 120.0

    def process(self, data: BurnIn) -> BurnOut:
        h = b"microswarm"
        for _ in range(data.rounds):
            h = hashlib.sha256(h).digest()
        return BurnOut(rounds=data.rounds, digest=h.hex())


class SleepIn(BaseModel):
    seconds: float = Field(ge=0, le=3600)


class SleepOut(BaseModel):
    slept: float


class Sleep(MicroCore[SleepIn, SleepOut]):
    """Waits the seconds it is given: a slow call for failover demos."""

    name = "demo.sleep"
    version = "1"
    idempotent = True
    timeout = 3600.0

    def process(self, data: SleepIn) -> SleepOut:
        t0 = time.monotonic()
        time.sleep(data.seconds)
        return SleepOut(slept=round(time.monotonic() - t0, 3))


class EchoIn(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
    data: bytes = Field(description="any bytes; base64 in JSON")


class EchoOut(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
    data: bytes
    size: int


class EchoBytes(MicroCore[EchoIn, EchoOut]):
    """Takes and returns a large bytes payload."""

    name = "demo.echo_bytes"
    version = "1"
    pure = False
    idempotent = True
    timeout = 60.0

    def process(self, data: EchoIn) -> EchoOut:
        return EchoOut(data=data.data, size=len(data.data))


BUILTINS: tuple[type[MicroCore], ...] = (Compute, IsPositive, ComputeAndClassify, CpuBurn, Sleep, EchoBytes)  # type: ignore[type-arg]
