"""Token buckets: how many messages of a kind an agent may send, with a burst.

A bucket holds up to `burst` tokens and gains `rate` a second; each message takes one. An empty
bucket is the agent's flood: link.py disconnects it with a sealed `rate_limited` refusal. The
figures (AGENT_LIMITS) are generous: an honest agent sends about one heartbeat a second, one
`installed` and at most one `fetch` per package it is given, and answers every job once, so it
never comes near them even under bench load (results and claims for jobs in flight are bounded by
the jobs the coordinator sent, and are not charged here).
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Bucket:
    rate: float          # tokens gained per second
    burst: float         # the most it holds (and what it starts with)
    tokens: float = -1.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst
        if not self.stamp:
            self.stamp = time.monotonic()

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend `n` tokens if there are; False (nothing spent) when the bucket is empty."""
        t = self.tokens + (now - self.stamp) * self.rate
        if t > self.burst:
            t = self.burst
        self.stamp = now
        if t < n:
            self.tokens = t
            return False
        self.tokens = t - n
        return True


# what a kind is called in a refusal
KIND_TEXT = {"heartbeat": "heartbeats", "pong": "pongs", "installed": "install reports", "fetch": "package fetches",
             "nested_call": "nested calls", "progress": "progress reports", "claim": "repeated job claims", "all": "messages",
             "bogus": "messages about jobs not in flight (results, claims, nested calls)"}

# kind -> (rate per second, burst). "all" is every message an agent sends except results and
# claims for jobs in flight; "bogus" is what refers to no job in flight (results, claims, nested
# calls): each is also a fault.
AGENT_LIMITS: dict[str, tuple[float, float]] = {
    "heartbeat": (5.0, 30.0),
    "pong": (5.0, 30.0),
    "installed": (50.0, 512.0),
    "fetch": (20.0, 512.0),
    "nested_call": (500.0, 1000.0),
    "claim": (500.0, 1000.0),
    "progress": (500.0, 1000.0),  # ~10/s per job (the agent and the worker hold back the rest)
    "bogus": (5.0, 20.0),
    "all": (2000.0, 4000.0),
}


class Limits:
    """One agent's buckets."""

    __slots__ = ("buckets", "tripped")

    def __init__(self, limits: dict[str, tuple[float, float]] | None = None) -> None:
        now = time.monotonic()
        given = AGENT_LIMITS if limits is None else limits
        self.buckets = {k: Bucket(r, b, stamp=now) for k, (r, b) in given.items()}
        self.tripped = ""  # the kind that ran out, once one has

    def allow(self, kind: str, now: float) -> bool:
        b = self.buckets.get(kind)
        if b is None or b.take(now):
            return True
        self.tripped = kind
        return False
