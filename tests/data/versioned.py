from pydantic import BaseModel

from microcores import MicroCore


class In(BaseModel):
    x: int


class Out(BaseModel):
    y: int
    version: str


class Versioned(MicroCore[In, Out]):
    name = "tests.versioned"
    version = "1"
    pure = True

    def process(self, data: In) -> Out:
        return Out(y=data.x * 1, version=self.version)
