"""The fleet's heartbeat pace: how often each agent says it is alive, so that all of them together
stay within a budget of heartbeats a second on the coordinator's one event loop.

One agent heartbeats every `floor` seconds (--heartbeat, 1 s); past `budget` agents the interval
grows with the fleet (10,000 agents at 1,000 a second: every 10 s), and the silence window grows
with it (--liveness is for the floor pace). Busy agents are watched by their jobs' own traffic and
timeouts, not by heartbeats; what a slower pace delays is noticing that an idle agent froze. Agents
hear a new pace in a Ping (heartbeat_s); it changes only when the fleet's size moves it by half or
more, so that a fleet around a boundary does not make the coordinator ping every agent each second.
"""
from __future__ import annotations

HEARTBEAT_BUDGET = 1000.0   # heartbeats a second from the whole fleet, at most (past the floor pace)
HYSTERESIS = 1.5            # the pace changes when the wanted one is this far off


class Pace:
    def __init__(self, floor_s: float, liveness_s: float, budget: float = HEARTBEAT_BUDGET) -> None:
        self.floor_s, self.base_liveness_s, self.budget = floor_s, liveness_s, budget
        self.heartbeat_s = floor_s

    @property
    def liveness_s(self) -> float:
        """Silent this long: removed (suspect after half); scales with the pace."""
        return self.base_liveness_s * self.heartbeat_s / self.floor_s

    def wanted(self, agents: int) -> float:
        return max(self.floor_s, round(agents / self.budget, 1))

    def update(self, agents: int) -> float | None:
        """The new pace when the fleet's size calls for one (tell every agent), else None."""
        want = self.wanted(agents)
        if want == self.heartbeat_s or self.heartbeat_s / HYSTERESIS < want < self.heartbeat_s * HYSTERESIS:
            return None
        self.heartbeat_s = want
        return want
