"""The fleet's heartbeat pace: how often each agent says it is alive, so that all of them together
stay within a budget of heartbeats a second on the coordinator's one event loop.

One agent heartbeats every `floor` seconds (--heartbeat, 1 s); past `budget` agents the interval
grows with the fleet (10,000 agents at 800 a second: every 12.5 s), and the silence window grows
with it (--liveness is for the floor pace). Busy agents are watched by their jobs' own traffic and
timeouts, not by heartbeats; what a slower pace delays is noticing that an idle agent froze. Agents
hear a new pace in a Ping (heartbeat_s). It slows as soon as the fleet would exceed the budget by
RISE (so the budget holds within 10%), and quickens only when the fleet shrank by a third or more,
so that a fleet around a boundary does not make the coordinator ping every agent each second.
"""
from __future__ import annotations

import math

HEARTBEAT_BUDGET = 800.0    # heartbeats a second from the whole fleet, at most (past the floor pace)
RISE = 1.1                  # the interval grows once the wanted one is this much longer...
FALL = 1.5                  # ...and shrinks once it is this much shorter


class Pace:
    def __init__(self, floor_s: float, liveness_s: float, budget: float = HEARTBEAT_BUDGET) -> None:
        self.floor_s, self.base_liveness_s, self.budget = floor_s, liveness_s, budget
        self.heartbeat_s = floor_s

    @property
    def liveness_s(self) -> float:
        """Silent this long: removed (suspect after half); scales with the pace."""
        return self.base_liveness_s * self.heartbeat_s / self.floor_s

    def wanted(self, agents: int) -> float:
        return max(self.floor_s, math.ceil(agents / self.budget * 10) / 10)  # in tenths of a second

    def update(self, agents: int) -> float | None:
        """The new pace when the fleet's size calls for one (tell every agent), else None."""
        want = self.wanted(agents)
        if self.heartbeat_s / FALL < want < self.heartbeat_s * RISE or want == self.heartbeat_s:
            return None
        self.heartbeat_s = want
        return want
