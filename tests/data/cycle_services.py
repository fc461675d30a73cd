"""Test services: a cycle (ping -> pong -> ping) and an unbounded recursion."""
from pydantic import BaseModel

from microcores import MicroCore


class N(BaseModel):
    n: int = 0


class Ping(MicroCore[N, N]):
    name = "cycle.ping"

    def process(self, data: N) -> N:
        return N(n=self.call("cycle.pong", {"n": data.n + 1})["n"])


class Pong(MicroCore[N, N]):
    name = "cycle.pong"

    def process(self, data: N) -> N:
        return N(n=self.call("cycle.ping", {"n": data.n + 1})["n"])
