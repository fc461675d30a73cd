"""What the scheduler has seen of each service's jobs: the basis for per-job timeouts and hedges.

Times are round trips as the coordinator sees them (job sent -> result back), not the worker's
own run time: a timeout must cover the agent's transport and queueing too, and that is what
grows under load. A window of recent samples keeps the figures current after a new version or a
change of load; percentiles are recomputed every few samples, not per call.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable

WINDOW = 256          # recent round trips kept per service
MIN_SAMPLES = 10      # fewer than this: no basis for a learnt timeout, the service's own applies
RECOMPUTE_EVERY = 8
TIMEOUT_FACTOR = 8.0  # a job may take this many times the recent p99 ...
TIMEOUT_FLOOR_S = 1.0  # ... and never less: a host stalled for a moment must not look like a dead agent
                       # (hedging, at the p95, is what keeps the latency low when one is slow)
HEDGE_FLOOR_S = 0.01


def percentiles(samples: Iterable[float], *qs: float) -> list[float]:
    """Nearest-rank percentiles (each q in 0..1) of the samples; zeros when there are none."""
    xs = sorted(samples)
    if not xs:
        return [0.0] * len(qs)
    n = len(xs) - 1
    return [xs[int(n * q)] for q in qs]


class ServiceTimes:
    __slots__ = ("samples", "_since", "p50", "p95", "p99")

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=WINDOW)
        self._since = 0
        self.p50 = self.p95 = self.p99 = 0.0

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        self._since += 1
        if self._since >= RECOMPUTE_EVERY or len(self.samples) <= MIN_SAMPLES:
            self._since = 0
            self.p50, self.p95, self.p99 = percentiles(self.samples, 0.5, 0.95, 0.99)

    @property
    def known(self) -> bool:
        return len(self.samples) >= MIN_SAMPLES

    def job_timeout(self, ceiling: float) -> float:
        """How long one attempt on an agent may take: a multiple of the recent p99 with a floor,
        never beyond `ceiling` (the service's timeout or the caller's deadline)."""
        if not self.known:
            return ceiling
        return min(ceiling, max(TIMEOUT_FLOOR_S, TIMEOUT_FACTOR * self.p99))

    def hedge_after(self) -> float | None:
        """A job still running past the recent p95 gets a second copy (None: no basis yet)."""
        if not self.known:
            return None
        return max(HEDGE_FLOOR_S, self.p95)


class HedgeBudget:
    """Hedges may add at most about `share` extra jobs (the tail-at-scale rule): each job earns
    `share` of a token, a hedge spends one; at most `burst` are saved up."""

    def __init__(self, share: float = 0.05, burst: float = 5.0) -> None:
        self.share, self.burst, self.tokens = share, burst, burst

    def earn(self) -> None:
        self.tokens = min(self.burst, self.tokens + self.share)

    def spend(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Observed:
    def __init__(self) -> None:
        self.services: dict[str, ServiceTimes] = {}

    def of(self, service: str) -> ServiceTimes:
        t = self.services.get(service)
        if t is None:
            t = self.services[service] = ServiceTimes()
        return t
