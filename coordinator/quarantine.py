"""Quarantine: an agent that keeps timing out or failing jobs gets none for a while.

The period doubles each time the same agent id is quarantined again (remembered across its
reconnections, so leaving and rejoining does not wipe the slate), up to a cap. Only time lifts
it: a heartbeat or any other frame from the agent does not.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

log = logging.getLogger("microswarm.quarantine")


class Striker(Protocol):
    agent_id: str
    strikes: int
    quarantined_until: float


class Quarantine:
    def __init__(self, base_s: float = 10.0, strikes: int = 3, cap_s: float = 600.0,
                 on_lift: Callable[[], None] | None = None, on_enter: Callable[[], None] | None = None) -> None:
        self.base_s, self.limit, self.cap_s = base_s, strikes, cap_s
        self.level: dict[str, int] = {}       # agent id -> times quarantined
        self.until: dict[str, float] = {}     # agent id -> monotonic end of its current quarantine
        self.last: dict[str, float] = {}      # agent id -> its last counted strike
        self.spacing_s = 0.5
        self.total = 0
        self.on_lift = on_lift
        self.on_enter = on_enter  # calls waiting only for this agent must not wait out its quarantine

    def strike(self, agent: Striker, why: str) -> None:
        """One failure. Failures closer together than `spacing_s` are one event (several jobs caught
        by the same stall of a busy host), so only failures that keep coming add up."""
        now = time.monotonic()
        if agent.quarantined_until > now or now - self.last.get(agent.agent_id, -1e9) < self.spacing_s:
            return
        self.last[agent.agent_id] = now
        agent.strikes += 1
        if agent.strikes >= self.limit:
            self._enter(agent, why)

    def convict(self, agent_id: str, agent: Striker | None, why: str) -> float:
        """Caught giving a wrong result (coordinator.verify): quarantined at once, connected or not,
        for at least four times the base period. Returns the period in seconds."""
        n = self.level[agent_id] = self.level.get(agent_id, 0) + 1
        period = min(self.cap_s, 4 * self.base_s * 2 ** (n - 1))
        self.until[agent_id] = time.monotonic() + period
        if agent is not None:
            agent.quarantined_until = self.until[agent_id]
            agent.strikes = 0
        self.total += 1
        log.warning("agent %s quarantined for %.0f s (time %d): %s", agent_id, period, n, why,
                    extra={"agent": agent_id})
        if self.on_enter is not None:
            self.on_enter()
        return period

    def cleared(self, agent: Striker) -> None:
        agent.strikes = 0

    def _enter(self, agent: Striker, why: str) -> None:
        n = self.level[agent.agent_id] = self.level.get(agent.agent_id, 0) + 1
        period = min(self.cap_s, self.base_s * 2 ** (n - 1))
        agent.quarantined_until = self.until[agent.agent_id] = time.monotonic() + period
        agent.strikes = 0
        self.total += 1
        log.warning("agent %s quarantined for %.0f s (time %d): %d failures in a row, the last: %s",
                    agent.agent_id, period, n, self.limit, why, extra={"agent": agent.agent_id})
        if self.on_enter is not None:
            self.on_enter()

    def joined(self, agent: Striker) -> None:
        """A reconnecting agent serves out the rest of its quarantine."""
        agent.quarantined_until = self.until.get(agent.agent_id, 0.0)

    def tick(self) -> None:
        """Forget quarantines that ended; wake the queue for the agents they free."""
        now = time.monotonic()
        ended = [aid for aid, t in self.until.items() if t <= now]
        for aid in ended:
            del self.until[aid]
            log.info("agent %s is out of quarantine", aid, extra={"agent": aid})
        if ended and self.on_lift is not None:
            self.on_lift()
