"""`/metrics`: the coordinator's figures in the Prometheus text format, for operators' monitoring.

Built on the official client library with a registry of our own: call counters and the latency
histogram move in the dispatcher's per-call observer; everything else (agents, jobs in flight,
cache, governor) is read live at scrape time, so a scrape costs nothing between scrapes.
Labels stay bounded: services are registered names (anything else is `unknown`); outcomes are
`success` or an error code, the first MAX_OUTCOMES distinct codes by name and `other` after them
(a service may raise its own codes); `executed_by` is `coordinator`, `cache`, or a connected
agent's id. Agent ids change with every agent process, so the series of an agent that has left
are dropped (when a new agent first answers, and at every scrape) and a call it finished after
leaving counts as `agent`: over months of volunteers coming and going, the series stay those of
the agents connected now.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from microswarm.protos import microswarm_pb2 as pb

from .calllog import CallEntry

if TYPE_CHECKING:
    from aiohttp import web

    from .server import Coordinator

MAX_OUTCOMES = 32
FIXED_RUNNERS = frozenset({"coordinator", "cache", "upstream", "-"})
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))


class _Live:
    """Values read when Prometheus scrapes."""

    def __init__(self, c: "Coordinator", label: Callable[[str], str]) -> None:
        self.c = c
        self.label = label

    def collect(self) -> Iterator[Any]:
        c = self.c
        yield GaugeMetricFamily("microswarm_agents_connected", "Agents connected to the coordinator",
                                value=len(c.agents))
        running = GaugeMetricFamily("microswarm_jobs_in_flight", "Jobs running now, by where they run",
                                    labels=["executed_by"])
        running.add_metric(["agents"], sum(a.running for a in c.agents.values()))
        running.add_metric(["coordinator"], c.local.running)
        yield running
        yield GaugeMetricFamily("microswarm_calls_in_flight", "Calls being answered now",
                                value=c.dispatcher.in_flight)
        yield GaugeMetricFamily("microswarm_queue_depth", "Calls waiting in line for an agent slot",
                                value=len(c.scheduler.queue))
        sch = c.scheduler.counts
        for key, text in (("retries", "Jobs moved to another executor after a failure or timeout"),
                          ("hedges", "Second copies sent for jobs running past their service's p95"),
                          ("late_results", "Results that came after their call was answered (dropped)"),
                          ("outcome_unknown", "Non-idempotent jobs whose agent vanished after they started")):
            yield CounterMetricFamily(f"microswarm_{key}", text, value=sch[key])
        yield CounterMetricFamily("microswarm_quarantines", "Agents put in quarantine", value=c.quarantine.total)
        verifications = CounterMetricFamily("microswarm_verifications", "Results of pure services by how they were "
                                            "verified (--verify): agreed, disagreed, unverified, coordinator",
                                            labels=["outcome"])
        for outcome, n in c.verifier.counts.as_dict().items():
            verifications.add_metric([outcome], n)
        yield verifications
        yield CounterMetricFamily("microswarm_cache_purged", "Cache entries purged because an agent that computed "
                                  "them was caught lying", value=c.verifier.counts.purged)
        served = getattr(c, "link", None)
        if served is not None:
            link = CounterMetricFamily("microswarm_link_limits", "What the agent link refused or did not count "
                                       "(link.py): sessions cut off (rate_limited, too_large, over_budget, "
                                       "stalled), results for jobs not sent (bogus_results), claims ignored",
                                       labels=["reason"])
            for reason, n in served.counts.items():
                link.add_metric([reason], n)
            yield link
            yield GaugeMetricFamily("microswarm_link_partial_bytes", "Bytes of agents' unfinished messages held "
                                    "now (at most the link budget)", value=served.partial_bytes)
        yield GaugeMetricFamily("microswarm_agents_quarantined", "Agents in quarantine now",
                                value=sum(1 for a in c.agents.values() if a.quarantined))
        slots = GaugeMetricFamily("microswarm_agent_slots", "Job slots each agent offers", labels=["agent"])
        for a in c.agents.values():
            slots.add_metric([self.label(a.agent_id)], a.slots)
        yield slots
        stats = c.cache_stats()
        if stats:
            yield CounterMetricFamily("microswarm_cache_hits", "Result cache hits", value=stats.get("hits", 0))
            yield CounterMetricFamily("microswarm_cache_misses", "Result cache misses", value=stats.get("misses", 0))
            yield CounterMetricFamily("microswarm_cache_evictions", "Entries evicted by the heap governor",
                                      value=stats.get("evictions", 0))
            yield GaugeMetricFamily("microswarm_cache_bytes", "Bytes accounted to cached results",
                                    value=stats.get("accounted_bytes", 0))
            yield GaugeMetricFamily("microswarm_cache_entries", "Entries in the result cache",
                                    value=stats.get("entries", 0))
            heap = stats.get("heap_bytes")
            yield GaugeMetricFamily("microswarm_governor_heap_bytes", "Coordinator memory the governor sees",
                                    value=heap if heap is not None else 0)
            yield CounterMetricFamily("microswarm_governor_collections", "Collections run by the governor",
                                      value=stats.get("collections", 0) or 0)
            if "shared_url" in stats:  # --cache-url: the shared region on Redis (cache_shared.py)
                yield GaugeMetricFamily("microswarm_shared_cache_up", "1 while Redis answers, 0 while unreachable",
                                        value=1 if stats.get("shared_up") else 0)
                for key, text in (("hits", "Near-cache misses answered from Redis"),
                                  ("misses", "Near-cache misses Redis did not have either"),
                                  ("writes", "Entries written to Redis"),
                                  ("write_skipped", "Through-writes not made: Redis unreachable or failing"),
                                  ("errors", "Redis operations that failed"),
                                  ("outages", "Times Redis became unreachable"),
                                  ("purged", "Entries of convicted agents deleted from Redis by this coordinator")):
                    yield CounterMetricFamily(f"microswarm_shared_cache_{key}", text, value=stats.get(f"shared_{key}", 0))
                yield GaugeMetricFamily("microswarm_shared_cache_write_queue", "Write-behind entries queued, not yet "
                                        "in Redis (what a crash would lose)", value=stats.get("write_queue", 0))
                yield GaugeMetricFamily("microswarm_shared_cache_write_queue_limit", "Write-behind queue bound",
                                        value=stats.get("write_queue_limit", 0))
                yield CounterMetricFamily("microswarm_shared_cache_write_dropped", "Write-behind entries dropped "
                                          "because the queue was full", value=stats.get("write_dropped", 0))
        presence = getattr(c, "presence", None)
        if presence is not None:
            yield GaugeMetricFamily("microswarm_cluster_coordinators", "Live coordinators of the cluster (presence "
                                    "on Redis), this one included", value=len(presence.view()))
        fw = getattr(getattr(c, "dispatcher", None), "forwarder", None)
        if fw is not None:  # coordinator/forward.py
            yield CounterMetricFamily("microswarm_calls_forwarded", "Calls sent on to another coordinator of the "
                                      "cluster, whose agents ran them", value=fw.counts["forwarded"])
            yield CounterMetricFamily("microswarm_calls_received", "Calls another coordinator of the cluster sent "
                                      "on to this one", value=fw.counts["received"])
            yield CounterMetricFamily("microswarm_calls_forward_fell_back", "Calls no peer took after all (none "
                                      "reachable): run here", value=fw.counts["fell_back"])


class Metrics:
    def __init__(self, coordinator: "Coordinator", require_token: bool = False) -> None:
        self.c = coordinator
        self.require_token = require_token
        # Volunteers' ids are for the operator only: an open /metrics labels agents by pseudonym
        self.label: Callable[[str], str] = (lambda aid: aid) if require_token else coordinator.state.pseudonym
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = Counter("microswarm_calls", "Calls answered, by service, outcome and who ran them",
                             ["service", "outcome", "executed_by"], registry=self.registry)
        self.duration = Histogram("microswarm_call_duration_seconds", "Time to answer a call, by service",
                                  ["service"], buckets=BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("microswarm_queue_wait_seconds", "Time calls waited in line for an agent slot",
                                    buckets=BUCKETS, registry=self.registry)
        coordinator.scheduler.queue.on_wait = self.queue_wait.observe
        self.registry.register(_Live(coordinator, self.label))
        self._outcomes: set[str] = {"success"}
        self._agent_series: dict[str, set[tuple[str, str]]] = {}  # agent id -> (service, outcome) it has
        coordinator.dispatcher.observers.append(self.observe)

    def observe(self, entry: CallEntry, reply: pb.CallReply) -> None:
        known = entry.service in self.c.registry.services or entry.service in self.c.routes
        service = entry.service if known else "unknown"
        outcome = "success" if entry.success else (entry.error_code or "error")
        if outcome not in self._outcomes:
            if len(self._outcomes) < MAX_OUTCOMES:
                self._outcomes.add(outcome)
            else:
                outcome = "other"
        who = entry.executed_by
        if who not in FIXED_RUNNERS:
            if who in self.c.agents:
                series = self._agent_series.get(who)
                if series is None:  # an agent's first answer: forget the agents that have left
                    self.prune()
                    series = self._agent_series[who] = set()
                series.add((service, outcome))
            else:
                who = "agent"  # it left before its answer came back
        self.calls.labels(service, outcome, self.label(who) if who in self._agent_series else who).inc()
        self.duration.labels(service).observe(entry.ms / 1000.0)

    def prune(self) -> None:
        """Drop the call series of agents no longer connected (ids are per agent process)."""
        for agent_id in [a for a in self._agent_series if a not in self.c.agents]:
            for service, outcome in self._agent_series.pop(agent_id):
                try:
                    self.calls.remove(service, outcome, self.label(agent_id))
                except KeyError:
                    pass

    def render(self) -> bytes:
        self.prune()
        return generate_latest(self.registry)

    async def handler(self, request: "web.Request") -> "web.Response":
        from aiohttp import web

        if self.require_token:
            self.c.gateway.bearer(request, "*")
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
