"""Placement: which agent holds which service's package (seed 002's strategies).

Seed 002 gives each new client tasks "in accordance with the strategy pursued (the most expensive
tasks, the most common, a combination of the two ... or purely just an arbitrary strategy)" and
scales "based on the number of calls to the task, its execution time, or a combination". Holding a
package costs an agent a worker process, so only services in use are placed:

* ``all``: every agent holds every service (an agent with ``max_packages`` N holds the N highest by
  total work, ties by name);
* ``common`` ranks by calls per minute, ``expensive`` by mean run time, ``combined`` by their
  product (total work), ``arbitrary`` by a random key drawn once per service.

A used service gets ``max(1, ceil(2 * n_agents * score / total))`` replicas (at most n_agents;
``arbitrary`` gives each the same share), so heavy services are held by more agents. The first
replica of every service is placed before any second one, in rank order: when ``max_packages``
runs short, the top-ranked services are held and coverage beats redundancy.

Hysteresis, so that holdings don't flap (every move starts or stops a worker):

* a service ranks by a *sticky* score, re-based only when its live score moves more than 25%;
* current holders are preferred when a service picks its holders;
* a holding younger than ``min_hold_s`` is kept, unless higher-ranked services took the capacity;
* a service stays in use until ``min_hold_s`` after its last call or ``give()``.
"""
from __future__ import annotations

import bisect
import heapq
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass

STRATEGIES: tuple[str, ...] = ("all", "arbitrary", "common", "expensive", "combined")

REBASE = 0.25           # a sticky score follows the live one only past this relative change
BUCKETS = 120           # per service: the window is kept as this many buckets, whatever its length
REPLICA_FACTOR = 2      # replicas per agent, summed over services, when nothing is capped


@dataclass(frozen=True)
class AgentView:
    """What placement sees of one connected agent."""
    agent_id: str
    max_packages: int       # 0 = no limit
    slots: int


class _Window:
    """Calls and run time of one service over the sliding window, in fixed buckets: exact counts
    with memory bounded by BUCKETS whatever the call rate."""

    __slots__ = ("buckets", "calls", "total_ms")

    def __init__(self) -> None:
        self.buckets: deque[list[float]] = deque()   # [bucket index, calls, total ms]
        self.calls = 0
        self.total_ms = 0.0

    def add(self, key: int, run_ms: float) -> None:
        if self.buckets and self.buckets[-1][0] >= key:
            b = self.buckets[-1]   # same bucket, or a late report: counted in the newest
        else:
            b = [key, 0, 0.0]
            self.buckets.append(b)
        b[1] += 1
        b[2] += run_ms
        self.calls += 1
        self.total_ms += run_ms

    def prune(self, oldest_key: int) -> None:
        while self.buckets and self.buckets[0][0] < oldest_key:
            _, n, ms = self.buckets.popleft()
            self.calls -= int(n)
            self.total_ms -= ms
        if not self.buckets:
            self.calls, self.total_ms = 0, 0.0   # no float residue once empty


class Placement:
    """Decides, from the calls it observes, which agents hold which services."""

    def __init__(self, strategy: str = "all", *, window_s: float = 120.0, interval_s: float = 5.0,
                 min_hold_s: float = 30.0, rng: random.Random | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown placement strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.name = strategy
        self.window_s = window_s
        self.interval_s = interval_s
        self.min_hold_s = min_hold_s
        self._rng = rng if rng is not None else random.Random()
        self._bucket_s = window_s / BUCKETS
        self._windows: dict[str, _Window] = {}
        self._last_use: dict[str, float] = {}         # last call or give(), outlives the window
        self._arbitrary: dict[str, float] = {}        # the random rank key of each service
        self._sticky: dict[str, float] = {}           # score at the last re-base
        self._plan: dict[str, set[str]] = {}
        self._since: dict[str, dict[str, float]] = {}  # agent -> service -> held since
        self._order: list[str] = []
        self._planned_at: float | None = None
        # observe() may come from the coordinator's worker threads
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ observations

    def observe(self, service: str, run_ms: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            w = self._windows.get(service)
            if w is None:
                w = self._windows[service] = _Window()
            w.add(int(now // self._bucket_s), max(0.0, run_ms))
            self._last_use[service] = max(now, self._last_use.get(service, now))

    def _window(self, service: str, now: float) -> _Window | None:
        w = self._windows.get(service)
        if w is not None:
            # a bucket is kept while any part of it lies within the window
            w.prune(math.floor((now - self.window_s) / self._bucket_s))
        return w

    def calls_per_min(self, service: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            w = self._window(service, now)
            return w.calls * 60.0 / self.window_s if w else 0.0

    def mean_run_ms(self, service: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            w = self._window(service, now)
            return w.total_ms / w.calls if w and w.calls else 0.0

    def score(self, service: str, now: float | None = None) -> float:
        if self.name == "all":
            return 1.0
        if self.name == "arbitrary":
            with self._lock:
                return self._arbitrary_key(service)
        return self._work_score(self.name, service, now)

    def _work_score(self, kind: str, service: str, now: float | None) -> float:
        if kind == "common":
            return self.calls_per_min(service, now)
        if kind == "expensive":
            return self.mean_run_ms(service, now)
        return self.calls_per_min(service, now) * self.mean_run_ms(service, now)

    def _arbitrary_key(self, service: str) -> float:
        key = self._arbitrary.get(service)
        if key is None:
            # 1 - random() is in (0, 1]: never a zero share of the replicas
            key = self._arbitrary[service] = 1.0 - self._rng.random()
        return key

    def _in_use(self, service: str, now: float) -> bool:
        w = self._window(service, now)
        return bool(w and w.calls) or now - self._last_use.get(service, -math.inf) < self.min_hold_s

    # ------------------------------------------------------------------ plans

    def plan(self, agents: list[AgentView], services: list[str], now: float | None = None) -> dict[str, set[str]]:
        now = time.monotonic() if now is None else now
        names = list(dict.fromkeys(services))
        if self.name == "all":
            used = names
        else:
            with self._lock:
                used = [s for s in names if self._in_use(s, now)]
        sticky = self._rebase(used, now)
        order = sorted(used, key=lambda s: (-sticky[s], s))
        with self._lock:
            self._forget_idle(now)
            previous = {a.agent_id: self._plan.get(a.agent_id, set()) for a in agents}
            if self.name == "all":
                new = {a.agent_id: set(order[:a.max_packages] if a.max_packages else order) for a in agents}
            else:
                new = self._place(agents, order, sticky, previous, now)
            self._since = {a: {s: self._since.get(a, {}).get(s, now) for s in held} for a, held in new.items()}
            self._plan = new
            self._order = order
            self._planned_at = now
            return {a: set(held) for a, held in new.items()}

    def _rebase(self, used: list[str], now: float) -> dict[str, float]:
        """Scores the plan ranks by: each follows its live score only past a REBASE change, so noise
        in the window neither reorders services nor changes their replica counts."""
        if self.name == "arbitrary":
            with self._lock:
                return {s: self._arbitrary_key(s) for s in used}
        kind = "combined" if self.name == "all" else self.name
        fresh: dict[str, float] = {}
        for s in used:
            live = self._work_score(kind, s, now)
            old = self._sticky.get(s)
            fresh[s] = live if old is None or abs(live - old) > REBASE * old else old
        self._sticky = fresh
        return fresh

    def _replicas(self, order: list[str], sticky: dict[str, float], n_agents: int) -> dict[str, int]:
        total = sum(sticky[s] for s in order)
        if self.name == "arbitrary" or total <= 0:
            share = {s: 1.0 / len(order) for s in order}
        else:
            share = {s: sticky[s] / total for s in order}
        return {s: min(n_agents, max(1, math.ceil(REPLICA_FACTOR * n_agents * share[s]))) for s in order}

    def _place(self, agents: list[AgentView], order: list[str], sticky: dict[str, float],
               previous: dict[str, set[str]], now: float) -> dict[str, set[str]]:
        new: dict[str, set[str]] = {a.agent_id: set() for a in agents}
        if not agents or not order:
            return new
        cap = {a.agent_id: a.max_packages or len(order) for a in agents}
        slots = {a.agent_id: a.slots for a in agents}
        tie = {a.agent_id: self._rng.random() for a in agents}
        want = self._replicas(order, sticky, len(agents))
        holders: dict[str, list[str]] = {s: [] for s in order}
        rank = {s: i for i, s in enumerate(order)}
        # rank positions of what each agent held: a newcomer goes where it displaces the least
        kept = {a: sorted(rank[s] for s in previous[a] if s in rank) for a in new}

        def displaced(agent_id: str, service: str) -> float:
            i = bisect.bisect_right(kept[agent_id], rank[service])
            return -kept[agent_id][i] if i < len(kept[agent_id]) else -math.inf

        def room(agent_id: str) -> bool:
            return len(new[agent_id]) < cap[agent_id]

        def take(service: str, upto: int) -> None:
            got = holders[service]
            if len(got) >= upto:
                return
            # current holders first: a move costs a worker start on one agent and a stop on another
            for a in sorted(a for a in previous if service in previous[a] and a not in got and room(a)):
                if len(got) >= upto:
                    return
                got.append(a)
                new[a].add(service)
            free = [a for a in new if a not in got and room(a)]
            if self.name == "arbitrary":
                picks = self._rng.sample(free, min(upto - len(got), len(free)))
            else:
                picks = heapq.nsmallest(upto - len(got), free, key=lambda a: (len(new[a]), displaced(a, service), -slots[a], tie[a]))
            for a in picks:
                got.append(a)
                new[a].add(service)

        for s in order:          # coverage first: one holder per service, top-ranked first
            take(s, 1)
        for s in order:          # then the replicas, and young holdings kept beyond them
            take(s, want[s])
            for a in sorted(previous):
                held_for = now - self._since.get(a, {}).get(s, -math.inf)
                if s in previous[a] and a not in holders[s] and held_for < self.min_hold_s and room(a):
                    holders[s].append(a)
                    new[a].add(s)
        return new

    def _forget_idle(self, now: float) -> None:
        """Drops what services out of use keep, so memory follows the services in use."""
        for s in [s for s, t in self._last_use.items() if now - t >= max(self.window_s, self.min_hold_s)]:
            del self._last_use[s]
            self._windows.pop(s, None)

    def holds(self, agent_id: str) -> set[str]:
        with self._lock:
            return set(self._plan.get(agent_id, ()))

    def ranking(self) -> list[str]:
        """The services the last plan placed, best first (for status and the dashboard)."""
        with self._lock:
            return list(self._order)

    def give(self, service: str, agents: list[AgentView], now: float | None = None) -> str | None:
        """A call for a service no connected agent holds: one agent takes it now rather than at the
        next plan, so the calls that follow can go to a volunteer."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._last_use[service] = max(now, self._last_use.get(service, now))
            present = [a for a in agents if service in self._plan.get(a.agent_id, ())]
            if present:
                return present[0].agent_id
            free = [a for a in agents
                    if not a.max_packages or len(self._plan.get(a.agent_id, ())) < a.max_packages]
            if not free:
                return None
            best = min(free, key=lambda a: (len(self._plan.get(a.agent_id, ())), -a.slots, self._rng.random()))
            self._plan.setdefault(best.agent_id, set()).add(service)
            self._since.setdefault(best.agent_id, {})[service] = now
            return best.agent_id

    def admit(self, agents: list[AgentView], services: list[str], now: float | None = None) -> bool:
        """Plan for agents that just joined, alone, when the strategy allows it: with "all" each
        holds the last plan's ranking up to its limit, whatever the others hold (the other strategies
        rebalance the fleet: False, make a whole plan). A whole plan looks at every agent, so this
        keeps a fleet's reconnection linear."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self.name != "all" or self._planned_at is None or set(services) != set(self._order):
                return False
            for a in agents:
                held = set(self._order[:a.max_packages] if a.max_packages else self._order)
                self._plan[a.agent_id] = held
                self._since[a.agent_id] = dict.fromkeys(held, now)
            return True

    def needs_replans(self, agents: list[AgentView]) -> bool:
        """Whether a plan can change with the calls observed: under "all" only for agents that hold a
        limited number of packages (the ranking decides which)."""
        return self.name != "all" or any(a.max_packages for a in agents)

    def mark_planned(self, now: float | None = None) -> None:
        self._planned_at = time.monotonic() if now is None else now

    def forget(self, agent_id: str) -> None:
        with self._lock:
            self._plan.pop(agent_id, None)
            self._since.pop(agent_id, None)

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self._planned_at is None or now - self._planned_at >= self.interval_s
