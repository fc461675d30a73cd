"""A MicroCore that calls a route from inside process(): a route is a service to self.call() too."""
from pydantic import BaseModel

from microcores import MicroCore


class Ask(BaseModel):
    id: int


class Told(BaseModel):
    name: str
    unit: str


class Lookup(MicroCore[Ask, Told]):
    name = "routes_user.lookup"

    def process(self, data: Ask) -> Told:
        found = self.call("pegawai.data", {"id": data.id})
        return Told(name=found["name"], unit=found["unit"])
