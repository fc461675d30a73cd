"""Result verification: volunteers' answers to pure services are checked by a second executor.

BOINC's answer to hosts that lie is replication with a quorum, and adaptive replication once a
host has earned trust. Here, for pure services (the only ones that may run twice):
  always    every job runs on two executors (never two agents of one named volunteer token);
            the answer goes out only when both agree.
  adaptive  (default) a result from an agent that has not earned trust is confirmed the same
            way; after `trust_after` agreements in a row its results are spot-checked with
            probability `spot_check`, and accepted otherwise.
  off       results are accepted as they come (only the output model checks them).
On a disagreement the coordinator runs the job itself and its answer stands: whoever disagreed
with it is quarantined, loses its trust, and every cache entry it produced is purged (entries
carry their producers, see `seal`/`opened`). A result is cached only once accepted by this policy.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from microcores import _codec

log = logging.getLogger("microswarm.verify")

MODES = ("adaptive", "always", "off")
COORDINATOR = "coordinator"


@dataclass
class Outcome:
    """One executor's answer: an output (validated, canonical) or the service's own error."""

    executor: str                 # an agent id or "coordinator"
    output: bytes = b""           # msgpack of the output (when `value` is not given)
    error: tuple[str, str, str] | None = None   # (code, message, field) of the service's own error
    attempts: int = 0
    verified_by: str = ""        # who confirmed it
    forged: bool = False         # an output no honest agent sends (it fails the service's model)
    value: Any = None            # the validated output as plain data
    model: Any = None            # ...and as the service's output model
    details: str = ""            # with `error`: a service_error's traceback (not compared between executors)

    @property
    def data(self) -> Any:
        return self.value if self.value is not None else _codec.unpack(self.output)

    @property
    def fingerprint(self) -> bytes:
        if self.error is not None:
            return b"error\0" + "\0".join(self.error).encode()
        return b"ok\0" + _codec.canonical(self.data)


@dataclass
class AgentTrust:
    in_row: int = 0               # agreements since its last disagreement
    agreements: int = 0
    disagreements: int = 0
    trusted: bool = False


@dataclass
class Counts:
    agreed: int = 0
    disagreed: int = 0
    unverified: int = 0
    coordinator: int = 0          # computed by the coordinator: nothing to confirm
    purged: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"agreed": self.agreed, "disagreed": self.disagreed, "unverified": self.unverified,
                "coordinator": self.coordinator}


@dataclass
class Verifier:
    mode: str = "adaptive"
    trust_after: int = 10
    spot_check: float = 0.05
    rng: Callable[[], float] = random.random
    ledger: dict[str, AgentTrust] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--verify {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.trust_after < 1:
            raise ValueError(f"--trust-after {self.trust_after} must be at least 1")
        if not 0.0 <= self.spot_check <= 1.0:
            raise ValueError(f"--spot-check {self.spot_check} must be a probability between 0 and 1")

    # ------------------------------------------------------------ trust

    def of(self, agent_id: str) -> AgentTrust:
        t = self.ledger.get(agent_id)
        if t is None:
            t = self.ledger[agent_id] = AgentTrust()
        return t

    def trust(self, agent_id: str, quarantined: bool) -> str:
        if quarantined:
            return "quarantined"
        t = self.ledger.get(agent_id)
        return "trusted" if t is not None and t.trusted else "new"

    def wants_second(self, executor: str) -> bool:
        """Does this executor's result need a second opinion before it goes out?"""
        if self.mode == "off" or executor == COORDINATOR:
            return False
        if self.mode == "always":
            return True
        t = self.ledger.get(executor)
        if t is None or not t.trusted:
            return True
        return self.rng() < self.spot_check

    def agreed(self, agent_id: str) -> None:
        if agent_id == COORDINATOR:
            return
        t = self.of(agent_id)
        t.in_row += 1
        t.agreements += 1
        if t.in_row >= self.trust_after and not t.trusted:
            t.trusted = True
            log.info("agent %s is trusted after %d agreements in a row", agent_id, t.in_row,
                     extra={"agent": agent_id})

    def disagreed(self, agent_id: str) -> None:
        t = self.of(agent_id)
        t.disagreements += 1
        t.in_row = 0
        t.trusted = False

    # ------------------------------------------------------------ one result

    async def settle(self, first: Outcome, second: Callable[[], Awaitable[Outcome]],
                     referee: Callable[[], Awaitable[Outcome]],
                     convict: Callable[[str, str], None]) -> tuple[Outcome, bool]:
        """The answer to give for `first`, and whether it is verified.

        `second` runs the job on another executor (another volunteer's agent, or the coordinator
        when none is free); `referee` runs it on the coordinator; `convict(agent, why)` punishes
        an agent whose answer the coordinator contradicted."""
        if first.executor == COORDINATOR:
            self.counts.coordinator += 1
            return first, True
        if not first.forged and not self.wants_second(first.executor):
            self.counts.unverified += 1
            return first, False
        other = await second()
        if other.fingerprint == first.fingerprint:
            self.counts.agreed += 1
            for who in (first.executor, other.executor):
                self.agreed(who)
            first.verified_by = other.executor
            first.attempts += other.attempts
            return first, True
        self.counts.disagreed += 1
        judge = other if other.executor == COORDINATOR else await referee()
        for o in (first, other):
            if o.executor == COORDINATOR:
                continue
            if o.fingerprint == judge.fingerprint:
                self.agreed(o.executor)
            else:
                self.disagreed(o.executor)
                convict(o.executor, f"its result for a job disagreed with the coordinator's ({_show(o)} "
                                    f"against {_show(judge)})")
        judge.attempts = first.attempts + other.attempts + (0 if judge is other else judge.attempts)
        return judge, True


def _show(o: Outcome) -> str:
    if o.error is not None:
        return f"error {o.error[0]}"
    return "another output"


# ------------------------------------------------------------ provenance of cache entries

_MAGIC = b"\xa5"


def seal(value: bytes, producers: Iterable[str], verified: bool) -> bytes:
    """A cache value that records who computed it and whether it was verified."""
    ids = [p.encode()[:255] for p in producers][:4]
    head = bytearray(_MAGIC)
    head.append(1 if verified else 0)
    head.append(len(ids))
    for i in ids:
        head.append(len(i))
        head += i
    return bytes(head) + value


def opened(stored: bytes) -> tuple[bytes, tuple[str, ...], bool]:
    """(value, producers, verified) of a cache value made by `seal`."""
    if stored[:1] != _MAGIC:
        return stored, (), False
    verified = stored[1] == 1
    n = stored[2]
    off = 3
    ids = []
    for _ in range(n):
        ln = stored[off]
        ids.append(stored[off + 1:off + 1 + ln].decode())
        off += 1 + ln
    return stored[off:], tuple(ids), verified


def made_by(agent_id: str) -> Callable[[bytes], bool]:
    """A predicate over stored cache values: did `agent_id` help compute it?"""
    needle = agent_id.encode()

    def test(stored: bytes) -> bool:
        return needle in stored[:1200] and agent_id in opened(stored)[1]
    return test
