"""The coordinator daemon: one gRPC server for clients (Coordinator, in client_api) and agents
(AgentLink, in agents), and the wiring of its parts: registry, scheduler, placement, cache."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, NamedTuple

from grpc import aio

from microcores import _codec, _publisher
from microcores._tls import CERT_FILE
from microswarm.protos import microswarm_pb2 as pb
from microswarm.protos import microswarm_pb2_grpc as pbg

from .agents import AgentSession
from .link import AgentLinkService
from .auth import ACCESS_TTL_S, Auth
from .cache import ResultCache, cache_key
from .cache_calls import SharedCacheDispatcher
from .calllog import CallLog
from .calls import CallStore
from .client_api import ClientService
from .dispatch import STRATEGIES
from .forward import holdings, peer_address
from .governor import GovernorSettings, HeapGovernor, combined_stats
from .local import LocalRunner
from .pace import HEARTBEAT_BUDGET, Pace
from .placement import STRATEGIES as PLACEMENTS
from .placement import AgentView, Placement
from .quarantine import Quarantine
from .registry import Registry, ServiceEntry
from .route_admin import RoutesService
from .route_calls import RouteCalls
from .routes import RouteTable
from .scheduler import Scheduler, SchedulerSettings
from .store import open_store
from .tls import ServerTLS
from .tls import prepare as prepare_tls
from .upstream import Upstream
from .volunteers import Volunteers, file_stamp
from .verify import Verifier, made_by

log = logging.getLogger("microswarm.coordinator")

MAX_CLIENT_MESSAGE = _codec.MAX_PAYLOAD + (1 << 20)
LINK_MAX_MESSAGE = 2 * 1024 * 1024
JOIN_REPLAN_S = 0.05  # agents that join within this long are planned for together (agent_joined)
STATUS_TTL_S = 0.5  # the agents of a Status reply are shared by the calls within this long (Coordinator.status)...
STATUS_SHARED_FROM = 256  # ...once there are this many agents (fewer cost < 3 ms a build: always exact)
PRESENCE_FIELDS = (  # pb.CoordinatorInfo from a presence record
    "id", "listen", "http", "fingerprint", "agents", "slots", "running", "calls_per_s", "uptime_s", "seen_s", "here",
    "peer", "forwarded", "received")


def raise_open_files_limit() -> tuple[int, int]:
    """The soft limit of open files up to the hard one (so a flood of connections cannot reach the
    default 1,024 and lock everyone out); (before, after). Logged."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        log.info("open files limit %s (already the hard limit)", soft)
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open files limit from %d to %d: %s", soft, target, exc)
        return soft, soft
    log.info("open files limit raised from %d to %d (the hard limit)", soft, target)
    return soft, target


class FleetTotals(NamedTuple):
    """The fleet as Status sums it up: agent ids in order (pages), holders per package digest."""
    ids: list[str]
    holders: dict[str, int]
    slots: int
    running: int


@dataclass
class CoordinatorConfig:
    listen: str = "127.0.0.1:7070"
    state_dir: str = ""
    dispatch: str = "random"
    placement: str = "all"
    heartbeat_s: float = 1.0
    liveness_s: float = 6.0          # silent this long: removed; half of it: suspect (at the floor pace)
    handshake_rate: float = 10.0     # agent handshakes one host may start a second (burst: 4x)
    heartbeat_budget: float = HEARTBEAT_BUDGET  # heartbeats a second from the whole fleet (pace.py)
    fallback_slots: int = 0          # the old name of local_slots (0: not set)
    local_slots: int | None = None   # jobs the coordinator runs itself at once; None: one per CPU; 0: never
    queue_wait_s: float = 2.0        # a call waits this long for an agent slot before the coordinator runs it
    queue_limit: int = 10_000
    max_attempts: int = 3
    quarantine_s: float = 10.0       # first quarantine; doubles on each repeat
    hedge: bool = True
    worker_idle_s: float = 120.0     # the coordinator's own idle workers stop after this
    drain_s: float = 30.0
    cache: bool = True
    http: str = ""                   # HOST:PORT of the HTTP/JSON gateway; empty: no gateway
    token_ttl_s: float = ACCESS_TTL_S  # lifetime of access tokens
    advertise: bool | None = None    # zeroconf on the LAN; None: unless listening on loopback
    metrics_auth: bool = False
    governor: GovernorSettings | None = None  # None: the defaults (see coordinator/governor.py)
    verify: str = "adaptive"         # results of pure services: adaptive | always | off (coordinator/verify.py)
    trust_after: int = 10            # agreements in a row before an agent's results are only spot-checked
    spot_check: float = 0.05         # chance a trusted agent's result is still confirmed
    publisher_keys: list[bytes] = field(default_factory=list)  # --publisher-key: raw Ed25519 public keys
    insecure: bool = False           # plaintext gRPC and HTTP (a trusted loopback only); default: TLS
    tls_cert: str | None = None      # the operator's own certificate chain (PEM) instead of the bound one
    tls_key: str | None = None
    result_ttl_s: float = 3600.0     # how long a submitted call's envelope is kept after it ends
    state_url: str = ""              # --state-url postgresql://...: shared state (pgstore.py); "": files
    cache_url: str = ""              # redis://...: the shared result region behind the near cache (cache_shared.py)
    cache_write: str = "through"     # through: in Redis before the answer; behind: queued, written in batches
    cache_write_queue: int = 10_000  # write-behind: entries queued at most (what a crash can lose)
    cache_write_batch: int = 256     # write-behind: entries per batch (a batch goes as soon as this many wait)
    cache_write_interval_s: float = 0.05  # write-behind: a batch at least this often
    cache_prefix: str = "microswarm"  # the cluster's key prefix in Redis
    peer_address: str = ""           # where the cluster's other coordinators reach this one; "": from --listen
    forward: bool = True             # send a call no agent here can take to a peer whose agents can (forward.py)


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        for flag, value in (("--handshake-rate", config.handshake_rate), ("--heartbeat-budget", config.heartbeat_budget)):
            if value <= 0:
                raise ValueError(f"{flag} {value:g} must be more than 0 a second")
        self.config = config
        self.store = open_store(config.state_dir, config.state_url)  # files, or PostgreSQL (store.py)
        self.state = self.store.state
        # credentials live in memory (re-read on SIGHUP and when their files change: watch_credentials),
        # so a coordinator out of file descriptors still checks them
        self._admin = self.state.admin_token(create=True) or ""
        self._admin_stamp = file_stamp(self.state.path / "admin.token")
        self.auth: Auth = self.store.auth(access_ttl=config.token_ttl_s)
        self._clients_stamp = file_stamp(self.auth.clients_file)
        self._credentials_error = ""
        self._status_cache: dict[tuple[Any, int], tuple[float, Any]] = {}  # _shared: (what, agents) -> (when, value)
        if not self.state.join_secrets():
            self.state.add_join_secret()
        self.volunteers: Volunteers = self.store.volunteers()  # tokens in memory; agent ids bound to keys
        self.volunteers.tokens.load()
        self._tokens_error = ""
        self._set_publisher_keys(config.publisher_keys)
        self.registry = Registry(self.state, config.publisher_keys)
        self.routes = RouteTable(self.state.path)  # routes to existing web services (routes.py)
        self.registry.taken = self.routes.__contains__  # a published service may not take a route's name
        self.upstream = Upstream()
        self.tls: ServerTLS | None = None
        if config.insecure:
            (self.state.path / CERT_FILE).unlink(missing_ok=True)  # clients must not pin a certificate not served
        else:
            self.tls = prepare_tls(self.state.path, self.state.identity, [config.listen, config.http],
                                   config.tls_cert, config.tls_key)
        self.agents: dict[str, AgentSession] = {}
        self.calllog = CallLog(path=self.state.path / "calls.jsonl")
        self.calls = CallStore(ttl_s=config.result_ttl_s)  # submitted calls, fetched later by id (calls.py)
        if config.dispatch not in STRATEGIES:
            raise ValueError(f"unknown dispatch strategy {config.dispatch!r}; choose one of {', '.join(STRATEGIES)}")
        if config.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {config.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        for name, value, low in (("--queue-wait", config.queue_wait_s, 0), ("--queue-limit", config.queue_limit, 1),
                                 ("--max-attempts", config.max_attempts, 1), ("--quarantine", config.quarantine_s, 0)):
            if value < low:
                raise ValueError(f"{name} {value} must be at least {low}")
        slots = config.local_slots
        if slots is None:
            slots = config.fallback_slots or max(1, os.cpu_count() or 1)
        if slots < 0:
            raise ValueError(f"--local-slots {slots} must be 0 (never run jobs here) or more")
        self.local = LocalRunner(self.state, max(1, slots), idle_s=config.worker_idle_s)
        self.link = AgentLinkService(self, config.handshake_rate)
        self.placement = Placement(config.placement, interval_s=2.0)
        self.quarantine = Quarantine(config.quarantine_s, on_lift=self.slot_freed, on_enter=self.holdings_changed)
        strategy = STRATEGIES[config.dispatch]()
        self.scheduler = Scheduler(
            self.agents, self.local, SchedulerSettings(config.queue_wait_s, config.queue_limit, slots,
                                                       config.max_attempts, config.hedge),
            strategy.pick, self.link.next_job_id, self.quarantine, self.place, self.wait_holdings)
        self.scheduler.ran = lambda service, seconds: self.placement.observe(service, seconds * 1000)
        self.verifier = Verifier(config.verify, config.trust_after, config.spot_check)
        self.dispatcher: SharedCacheDispatcher = SharedCacheDispatcher(self, self.scheduler, strategy, self.verifier)
        self.route_calls = RouteCalls(self.routes, self.upstream, lambda: self.cache)
        self.dispatcher.routes = self.route_calls
        self.pace = Pace(config.heartbeat_s, config.liveness_s, config.heartbeat_budget)
        self._joined: list[AgentSession] = []  # agents welcomed since the last join replan
        self._by_volunteer: dict[str, dict[str, AgentSession]] = {}  # named token -> its connected agents
        self.cache: Any = None
        self.governor: Any = None
        self.shared: Any = None     # the shared region on Redis (--cache-url), behind self.cache
        self.presence: Any = None   # this coordinator's record in Redis, and the cluster's (presence.py)
        self.peer_address = ""      # where the cluster's other coordinators reach this one (forward.py)
        self.started = time.time()
        self.server: aio.Server | None = None
        self.port = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = asyncio.Event()
        self._holdings_event = asyncio.Event()
        self.gateway: Any = None  # the HTTP app: add routes with gateway.add_route() before start()
        if config.http:
            from .dashboard import Dashboard
            from .gateway import Gateway
            from .metrics import Metrics
            self.gateway = Gateway(self, config.http, self.tls.ssl_context() if self.tls else None)
            self.metrics = Metrics(self, require_token=config.metrics_auth)
            self.gateway.add_route("GET", "/metrics", self.metrics.handler)
            self.dashboard = Dashboard(self)
            self.dashboard.routes(self.gateway.add_route)

    # ------------------------------------------------------------ agents

    def holdings_for(self, agent: AgentSession) -> pb.Holdings:
        """The packages placement gives this agent (placement.py; `all`: every current one).

        What the agent held beyond the new set stops counting at once: no job goes to a
        version that is no longer current, nor to a package it was told to drop."""
        names = self.placement.holds(agent.agent_id)
        refs = [e.ref for e in self.registry.current() if e.name in names]
        agent.holdings &= {r.digest for r in refs}
        agent.planned = set(names)
        return pb.Holdings(packages=refs)

    def _views(self) -> list[AgentView]:
        return [a.view for a in self.agents.values() if not a.closed]

    def replan(self, force: bool = False) -> None:
        """Re-decide who holds what from the calls and run times observed; tell the agents whose
        set changed (all of them when `force`: a new version was published)."""
        plan = self.placement.plan(self._views(), [e.name for e in self.registry.current()])
        changed = False
        for a in list(self.agents.values()):
            if a.welcomed and (force or plan.get(a.agent_id, set()) != a.planned):
                a.send(pb.ToAgent(holdings=self.holdings_for(a)))
                changed = True
        if changed:
            self.holdings_changed()

    def agent_joined(self, agent: AgentSession) -> None:
        """Joins are planned for together, JOIN_REPLAN_S after the first: a replan looks at every
        agent, so one per join would make a fleet's reconnection O(n^2)."""
        self._joined.append(agent)
        if len(self._joined) == 1:
            asyncio.get_running_loop().call_later(JOIN_REPLAN_S, self._plan_joined)

    def _plan_joined(self) -> None:
        joined, self._joined = [a for a in self._joined if not a.closed], []
        names = [e.name for e in self.registry.current()]
        admitted = self.placement.admit([a.view for a in joined], names)
        if admitted:
            for agent in joined:
                agent.send(pb.ToAgent(holdings=self.holdings_for(agent)))
        else:
            self.replan()  # tells the agents whose set changed
        ready = False
        for agent in joined:
            if not agent.planned:  # nothing for it yet (placement places services in use): ready at once
                if not admitted:
                    agent.send(pb.ToAgent(holdings=self.holdings_for(agent)))
                agent.state = "ready"
                ready = True
        if ready:
            self.holdings_changed()

    def place(self, entry: ServiceEntry) -> bool:
        """A call for a package nobody holds: give it to an agent with room now. True if one got it."""
        aid = self.placement.give(entry.name, self._views())
        agent = self.agents.get(aid) if aid else None
        if agent is None or not agent.welcomed:
            return False
        if entry.name not in agent.planned:
            agent.send(pb.ToAgent(holdings=self.holdings_for(agent)))
            log.info("placement: %s given to agent %s on its first call", entry.name, agent.agent_id)
        return agent.installing(entry.digest)

    def holdings_changed(self) -> None:
        """Wake calls waiting for an agent to finish installing a package, or for a holder."""
        self._holdings_event.set()
        self._holdings_event = asyncio.Event()
        self.scheduler.holdings_changed()

    def slot_freed(self, agent: AgentSession | None = None) -> None:
        self.scheduler.slot_freed()

    def convict(self, agent_id: str, why: str) -> None:
        """An agent's result was contradicted by the coordinator's own (verify.py): quarantine it,
        reset its trust (done by the verifier) and purge every cache entry it helped compute."""
        self.quarantine.convict(agent_id, self.agents.get(agent_id), why)
        purged = 0
        if self.cache is not None:
            purged, _ = self.cache.purge(made_by(agent_id))
            self.verifier.counts.purged += purged
        if self.shared is not None:  # Redis, and (pub/sub) the other coordinators' near caches
            self._tasks.append(asyncio.create_task(self.shared.purge_producer(agent_id)))
        log.warning("agent %s gave a wrong result; %d cache entr%s it computed purged", agent_id, purged,
                    "y" if purged == 1 else "ies", extra={"agent": agent_id, "event": "wrong_result"})

    def same_volunteer(self, agent_id: str) -> frozenset[str]:
        """The agents a result of `agent_id` must not be confirmed by: itself, and the other agents of
        its volunteer (the same named join token), who could lie in concert."""
        a = self.agents.get(agent_id)
        name = a.token_name if a is not None else ""
        if not name:
            return frozenset({agent_id})
        return frozenset({agent_id} | {b.agent_id for b in self.volunteer_agents(name)})

    def add_agent(self, agent: AgentSession) -> None:
        self.agents[agent.agent_id] = agent
        self.scheduler.fleet_changed()
        if agent.token_name:
            self._by_volunteer.setdefault(agent.token_name, {})[agent.agent_id] = agent

    def volunteer_agents(self, token_name: str) -> list[AgentSession]:
        """The connected agents of a named volunteer token (none for the shared one): an index, so that
        joins and verification do not scan the whole fleet."""
        return list(self._by_volunteer.get(token_name, {}).values()) if token_name else []

    def late_result(self, agent: AgentSession, rec: Any) -> None:
        self.scheduler.late_result(agent, rec)

    async def wait_holdings(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._holdings_event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def drop_agent(self, agent: AgentSession, reason: str) -> None:
        if agent.closed:
            return
        agent.closed = True
        agent.ended.set()
        if self.agents.get(agent.agent_id) is agent:
            del self.agents[agent.agent_id]
            self.placement.forget(agent.agent_id)
            self.scheduler.fleet_changed()
        mine = self._by_volunteer.get(agent.token_name)
        if mine is not None and mine.get(agent.agent_id) is agent:
            del mine[agent.agent_id]
            if not mine:
                del self._by_volunteer[agent.token_name]
        agent.fail_all(reason)
        agent.outbox.put_nowait(None)
        self.holdings_changed()
        log.info("agent %s removed: %s", agent.agent_id, reason, extra={"agent": agent.agent_id})

    def suspect(self, agent: AgentSession, why: str) -> None:
        """No new jobs, a ping, and the calls waiting on its jobs move on (it may be frozen)."""
        if agent.state in ("joining", "ready") and not agent.closed:
            agent.state = "suspect"
            agent.ping_seq += 1
            agent.send(pb.ToAgent(ping=pb.Ping(seq=agent.ping_seq)))
            agent.fail_all(f"silent: {why}", silent=True)
            log.warning("agent %s suspect: %s", agent.agent_id, why, extra={"agent": agent.agent_id})
            self.holdings_changed()

    async def _liveness(self) -> None:
        """Silent past half the window: suspect (no new jobs) and pinged; past the window: removed.
        Also the scheduler's clock: quarantines end, placement re-decides."""
        next_scan = 0.0
        while True:
            await asyncio.sleep(min(0.5, self.pace.floor_s / 2))
            now = time.monotonic()
            if now >= next_scan:  # each agent's silence and stalled frames: a pass over the fleet, so at
                next_scan = now + min(self.pace.heartbeat_s / 4, 2.5)  # most 4 per heartbeat interval
                window = self.pace.liveness_s
                fleet = list(self.agents.values())
                for a in fleet:
                    silent = now - a.last_seen
                    if silent > window:
                        self.drop_agent(a, f"silent for {silent:.1f} s")
                    elif silent > window / 2:
                        self.suspect(a, f"no heartbeat for {silent:.1f} s")
                self.link.sweep(fleet)
            pace = self.pace.update(len(self.agents))
            if pace is not None:
                log.info("%d agents: they now heartbeat every %.1f s (silent for %.0f s: removed)",
                         len(self.agents), pace, self.pace.liveness_s)
                for a in self.agents.values():  # the old window still holds until they have heard it
                    a.last_seen = max(a.last_seen, now)
                    a.ping_seq += 1
                    a.send(pb.ToAgent(ping=pb.Ping(seq=a.ping_seq, heartbeat_s=pace)))
            self._flush_bindings()
            self.watch_tokens()
            self.watch_credentials()
            self.quarantine.tick()
            if self.placement.due():
                views = self._views()
                if self.placement.needs_replans(views):
                    self.replan()
                else:
                    self.placement.mark_planned()
            await self.local.reap()

    def _on_publish(self, entry: ServiceEntry) -> None:
        """Runs on the publishing thread: hand the broadcast to the event loop."""
        self.loop.call_soon_threadsafe(self._broadcast_holdings)

    def _broadcast_holdings(self) -> None:
        self.replan(force=True)

    # ------------------------------------------------------------ cache

    def cache_key(self, entry: ServiceEntry, value: Any) -> bytes:
        return cache_key(entry.digest, entry.name, _codec.canonical(value))

    def cache_stats(self) -> dict[str, Any]:
        if self.cache is None:
            return {}
        if self.governor is not None:
            return combined_stats(self.cache, self.governor)
        return self.cache.stats()

    # ------------------------------------------------------------ status

    def status(self, recent: int, operator: bool = True, offset: int = 0, limit: int = 0) -> pb.StatusReply:
        """What `microswarm status` shows. Only the operator sees volunteers' ids, addresses and token
        names; anyone else gets `redacted` and stable pseudonyms instead (see _redact). With `limit`
        only that page of agents (by id) is built; the whole list and the fleet's totals are built at
        most once per STATUS_TTL_S (_fleet, _agents_view): with thousands of agents they take the event
        loop for a while, so repeated and concurrent callers share them; the rest (scheduler, services,
        the call log, the cache) is fresh on every call."""
        fleet = self._fleet()
        reply = self._status(recent, agents=False, holders=fleet.holders)
        if not operator:
            self._redact(reply)  # the call log; the view's agents are redacted already
        if limit:
            page = pb.StatusReply()
            self._agent_infos(page, [self.agents[i] for i in fleet.ids[offset:offset + limit] if i in self.agents])
            if not operator:
                self._redact(page)
            reply.MergeFrom(page)
        else:
            reply.MergeFrom(self._agents_view(operator))
        reply.agents_total, reply.slots_total, reply.running_total = len(fleet.ids), fleet.slots, fleet.running
        return reply

    def _shared(self, key: Any, build: Callable[[], Any]) -> Any:
        """`build()`'s value, shared by the callers within STATUS_TTL_S once the fleet is large (rebuilt
        at once when agents come or go)."""
        if len(self.agents) < STATUS_SHARED_FROM:
            return build()
        now = time.monotonic()
        full = (key, len(self.agents))
        hit = self._status_cache.get(full)
        if hit is not None and now - hit[0] < STATUS_TTL_S:
            return hit[1]
        value = build()
        self._status_cache = {k: v for k, v in self._status_cache.items() if k[0] != key}
        self._status_cache[full] = (now, value)
        return value

    def _fleet(self) -> FleetTotals:
        def build() -> FleetTotals:
            holders: dict[str, int] = {}
            slots = running = 0
            for a in self.agents.values():
                slots += a.slots
                running += a.running
                for d in a.holdings:
                    holders[d] = holders.get(d, 0) + 1
            return FleetTotals(sorted(self.agents), holders, slots, running)
        return self._shared("fleet", build)  # type: ignore[no-any-return]

    def _agents_view(self, operator: bool) -> pb.StatusReply:
        """A reply holding only the agents (all of them), for the operator or redacted."""
        def build() -> pb.StatusReply:
            view = pb.StatusReply()
            self._agent_infos(view, sorted(self.agents.values(), key=lambda a: a.agent_id))
            if not operator:
                self._redact(view)
            return view
        return self._shared(("agents", operator), build)  # type: ignore[no-any-return]

    def _redact(self, reply: pb.StatusReply) -> None:
        alias = self.state.pseudonym
        reply.redacted = True
        for a in reply.agents:
            a.agent_id, a.address, a.token_name = alias(a.agent_id), "", ""
        for call in reply.calls:
            if call.executed_by not in ("coordinator", "cache", "upstream", "", "-"):
                call.executed_by = alias(call.executed_by)
            if call.via_agent:
                call.via_agent = alias(call.via_agent)
            if call.client.startswith("agent:"):  # a nested call: the agent whose job asked
                call.client = "agent:" + alias(call.client[6:])

    def _agent_infos(self, reply: pb.StatusReply, agents: list[AgentSession]) -> None:
        v = self.verifier
        for a in agents:
            info = a.info()
            t = v.of(a.agent_id)
            info.trust = v.trust(a.agent_id, a.quarantined)
            info.agreements, info.disagreements, info.agreements_in_row = t.agreements, t.disagreements, t.in_row
            reply.agents.append(info)

    def _status(self, recent: int, agents: bool = True, holders: dict[str, int] | None = None) -> pb.StatusReply:
        reply = pb.StatusReply(coordinator_id=self.state.fingerprint.hex()[:16], listen=self.config.listen,
                               uptime_s=time.time() - self.started, dispatch=self.dispatcher.strategy.name,
                               placement=self.placement.name, calls_total=self.calllog.total,
                               fallbacks_total=self.dispatcher.fallbacks)
        sch = self.scheduler
        p50, p99 = sch.queue.wait_percentiles()
        n = sch.counts
        reply.scheduler.CopyFrom(pb.SchedulerInfo(
            queue_depth=len(sch.queue), queue_limit=sch.queue.limit, queue_wait_s=sch.s.queue_wait_s,
            queue_wait_p50_ms=p50 * 1000, queue_wait_p99_ms=p99 * 1000, local_slots=sch.local_slots.n,
            local_running=sch.local_slots.used, max_attempts=sch.s.max_attempts, retries_total=n["retries"],
            hedges_total=n["hedges"], late_results_total=n["late_results"], outcome_unknown_total=n["outcome_unknown"],
            quarantines_total=self.quarantine.total, overloaded_total=sch.queue.overloaded,
            offloaded_total=n["offloaded"], local_total=n["local"],
            staged_total=n["staged"]))
        v = self.verifier
        reply.verify.CopyFrom(pb.VerifyInfo(mode=v.mode, trust_after=v.trust_after, spot_check=v.spot_check,
                                            agreed_total=v.counts.agreed, disagreed_total=v.counts.disagreed,
                                            unverified_total=v.counts.unverified, purged_total=v.counts.purged))
        if agents:
            self._agent_infos(reply, sorted(self.agents.values(), key=lambda a: a.agent_id))
        for e in self.registry.current():
            held = holders.get(e.digest, 0) if holders is not None else \
                sum(1 for a in self.agents.values() if e.digest in a.holdings)
            reply.services.append(pb.ServiceInfo(
                name=e.name, version=e.version, digest=e.digest, pure=e.cls.pure, idempotent=e.cls.idempotent,
                timeout_s=float(e.cls.timeout), builtin=e.builtin, agents=held, revision=e.revision,
                description=(e.cls.__doc__ or "").strip().split("\n")[0]))
        reply.routes.extend(r.service_info() for r in self.routes.current())
        for c in self.calllog.recent(recent or 20):
            reply.calls.append(pb.CallRecord(time=c.time, client=c.client, service=c.service,
                                             executed_by=c.executed_by, success=c.success, ms=c.ms,
                                             error_code=c.error_code, attempts=c.attempts, cache_hit=c.cache_hit,
                                             via_agent=c.via_agent))
        stats = self.cache_stats()
        if stats:
            reply.cache_json = json.dumps(stats).encode()
        if self.presence is not None:
            for rec in self.presence.view():
                reply.coordinators.append(pb.CoordinatorInfo(**{k: rec[k] for k in PRESENCE_FIELDS if k in rec}))
        return reply

    def _set_publisher_keys(self, keys: list[bytes]) -> None:
        """Persist the --publisher-key set for `coordinator token` (another process) to put in tokens."""
        try:
            before = self.state.publisher_keys()
        except ValueError:
            before = []
        self.state.save_publisher_keys(keys)
        if keys:
            log.info("publisher keys: only packages signed by one of [%s] are accepted; join tokens carry them",
                     _publisher.names(keys))
        if set(before) != set(keys):
            log.warning("the publisher keys changed since the last start (were [%s], now [%s]): tokens minted "
                        "before carry the old set; give volunteers new tokens (`microswarm coordinator token`)",
                        _publisher.names(before), _publisher.names(keys))

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.registry.load()
        self.routes.load(taken=self.registry.services.__contains__)
        self.registry.listeners.append(self._on_publish)
        self.store.start(self)  # with PostgreSQL: follow what other coordinators change
        if self.config.cache:
            self._start_cache()
            if self.config.cache_url:
                await self.shared.start()
        opts = [("grpc.max_receive_message_length", MAX_CLIENT_MESSAGE),
                ("grpc.max_send_message_length", MAX_CLIENT_MESSAGE),
                ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1), ("grpc.so_reuseport", 0),
                # No BDP probing: with it gRPC grows a stream's window (to tens of MiB) and buffers what a
                # peer sends before the handler asks for a message, so unauthenticated agent streams
                # could park memory before any check (300 unread streams: 649 vs 67 MiB). A message the
                # handler does ask for still flows whole: the window opens to its size (docs/design.md).
                ("grpc.http2.bdp_probe", 0),
                # a connection that has not finished its (TLS) handshake is dropped after 15 s, not 120
                ("grpc.server_handshake_timeout_ms", 15_000)]
        self.server = aio.server(options=opts)
        pbg.add_CoordinatorServicer_to_server(ClientService(self), self.server)
        pbg.add_AgentLinkServicer_to_server(self.link, self.server)
        pbg.add_RoutesServicer_to_server(RoutesService(self), self.server)
        if self.tls is not None:
            self.port = self.server.add_secure_port(self.config.listen, self.tls.grpc_credentials())
        else:
            self.port = self.server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}: the address is in use or invalid")
        if self.gateway is not None:  # before gRPC answers: a cluster that answers serves HTTP too
            await self.gateway.start()
        await self.server.start()
        await self._advertise()
        self._tasks.append(asyncio.create_task(self._liveness()))
        self._tasks.append(asyncio.create_task(self.auth.run_housekeeping()))
        if self.shared is not None:
            from .presence import Presence, instance_id
            # once (a wildcard --listen means resolving this host's name), now that the port is known
            self.peer_address = peer_address(self.config.peer_address, self.config.listen, self.port)
            self.presence = Presence(self.shared, instance_id(self.config.listen), self._presence_record)
            self.presence.start()
            if self.config.forward:
                from .forward import Forwarder
                self.dispatcher.forwarder = Forwarder(self.presence.id, self.state.fingerprint.hex(),
                                                      lambda: self.presence.peers,
                                                      str(self.state.path), self.config.insecure,
                                                      own_cert=bool(self.config.tls_cert))
        if self.gateway is not None:  # the dashboard's charts: gauges once a second
            self._tasks.append(asyncio.create_task(self.dashboard.timeline.run(self.dashboard.gauges)))
        log.info("coordinator %s listening on %s with %d services", self.state.fingerprint.hex()[:16],
                 self.config.listen, len(self.registry.services))

    def _start_cache(self) -> None:
        if self.config.cache_url:
            from .cache_shared import NearCache, SharedRegion
            c = self.config
            self.shared = SharedRegion(c.cache_url, write=c.cache_write, prefix=c.cache_prefix,
                                       queue_limit=c.cache_write_queue, batch=c.cache_write_batch,
                                       interval_s=c.cache_write_interval_s, on_purge=self._purged_elsewhere)
            self.cache = NearCache(self.shared)
        else:
            self.cache = ResultCache()
        settings = self.config.governor or GovernorSettings.from_options(None, None, None, None)
        self.governor = HeapGovernor(self.cache, settings)
        self.governor.start()

    def _purged_elsewhere(self, agent_id: str) -> int:
        """Another coordinator convicted `agent_id` (cache_shared.py): purge what this near cache holds of it."""
        purged, _ = self.cache.purge(made_by(agent_id))
        self.verifier.counts.purged += purged
        return int(purged)

    def _presence_record(self) -> dict[str, Any]:
        fleet = self._fleet()
        return {"listen": self.config.listen, "http": self.gateway.url if self.gateway is not None else "",
                "fingerprint": self.state.fingerprint.hex()[:16], "agents": len(fleet.ids), "slots": fleet.slots,
                "running": fleet.running, "uptime_s": round(time.time() - self.started, 1),
                "calls_total": self.calllog.total, "peer": self.peer_address,
                "holds": holdings(self.agents.values()), **self.forward_counts()}

    def forward_counts(self) -> dict[str, int]:
        fw = self.dispatcher.forwarder
        return {"forwarded": fw.counts["forwarded"], "received": fw.counts["received"]} if fw is not None else {}

    async def _advertise(self) -> None:
        """Zeroconf: `_microswarm._tcp.local.` with the port and the key fingerprint (see _discovery)."""
        from microcores._discovery import Advertiser, should_advertise
        from microcores._secure import PROTOCOL

        self.advertiser: Any = None
        if not should_advertise(self.config.listen, self.config.advertise):
            return
        fp = self.state.fingerprint.hex()
        try:
            self.advertiser = Advertiser(self.config.listen, self.port, fp, fp[:16], PROTOCOL)
            await self.advertiser.start()
        except (OSError, ValueError) as exc:
            log.warning("not advertising on the LAN: %s", exc)
            self.advertiser = None

    def reload(self) -> dict[str, Any]:
        """SIGHUP: re-read what can change under a running coordinator.

        Published packages (registry.json: versions published by another process, restored, or
        removed), join secrets (agents that joined with a secret no longer listed are dropped,
        and their reconnection is refused), and the gateway's client list (auth's reload hook)."""
        changed = self.registry.reload()
        if changed:
            self._broadcast_holdings()
            self.holdings_changed()
        current, revoked = self._reload_tokens()
        try:
            self._reload_admin()
        except (OSError, ValueError) as exc:
            log.error("admin credential not reloaded, keeping the current one: %s", exc)
        clients = -1
        hook = getattr(self.auth, "reload", None) or getattr(self.auth, "load", None)
        if hook is not None:
            hook()
            clients = len(getattr(self.auth, "clients", {}))
        summary = {"services_changed": changed, "agents_dropped": [a.agent_id for a in revoked],
                   "join_secrets": current, "clients": clients}
        log.info("reloaded: %d service(s) changed%s, %d join secret(s), %d agent(s) dropped%s",
                 len(changed), f" ({', '.join(changed)})" if changed else "", current, len(revoked),
                 f", {clients} client(s)" if clients >= 0 else "", extra={"event": "reload"})
        return summary

    def _reload_tokens(self) -> tuple[int, list[AgentSession]]:
        """Re-read the join tokens; drop the agents whose token is gone or revoked at once (a revoked
        named token's agents are told so, sealed, and stop). (tokens in force, agents dropped)."""
        book = self.volunteers.tokens
        book.load()
        active = book.active_digests()
        dropped = [a for a in list(self.agents.values()) if a.join_secret and a.join_secret not in active]
        for a in dropped:
            tok = book.by_digest.get(a.join_secret)
            if tok is not None and tok.revoked:
                a.send(pb.ToAgent(refusal=pb.Refusal(code="token_revoked", message=(
                    f"the token {tok.name!r} was revoked by the operator; ask for a new one"))))
                self.drop_agent(a, f"its token {tok.name!r} was revoked")
            else:
                self.drop_agent(a, "its join secret was revoked")
        return len(active), dropped

    def watch_tokens(self) -> None:
        """`microswarm coordinator token|tokens` run in another process and only write the file:
        a changed file is reloaded here, within half a second."""
        try:
            if self.volunteers.tokens.changed():
                self._reload_tokens()
            self.volunteers.bindings.touch(self.agents)
        except (OSError, ValueError) as exc:  # damaged or half-restored: keep the tokens in memory
            if str(exc) != self._tokens_error:
                log.error("join tokens not reloaded, keeping the current ones: %s", exc)
            self._tokens_error = str(exc)
        else:
            self._tokens_error = ""

    def admin_credential(self) -> str:
        """The operator's credential (admin.token), from memory."""
        return self._admin

    def _reload_admin(self) -> None:
        self._admin_stamp = file_stamp(self.state.path / "admin.token")
        admin = self.state.admin_token(create=False)
        if not admin:
            raise ValueError(f"{self.state.path / 'admin.token'} is missing or empty")
        if admin != self._admin:
            log.info("admin credential reloaded", extra={"event": "reload"})
        self._admin = admin

    def watch_credentials(self) -> None:
        """admin.token and clients.json changed by another process are re-read within half a second;
        a damaged or missing file keeps the ones in memory."""
        try:
            if file_stamp(self.state.path / "admin.token") != self._admin_stamp:
                self._reload_admin()
            stamp = file_stamp(self.auth.clients_file)
            if stamp != self._clients_stamp:
                self._clients_stamp = stamp
                self.auth.reload_clients()
        except (OSError, ValueError) as exc:
            if str(exc) != self._credentials_error:
                log.error("credentials not reloaded, keeping the current ones: %s", exc)
            self._credentials_error = str(exc)
        else:
            self._credentials_error = ""

    def _on_sighup(self) -> None:
        try:
            self.reload()
        except Exception as exc:  # a damaged file: keep serving what is loaded, and say why
            log.error("reload failed, keeping the current state: %s", exc)

    async def stop(self, drain_s: float | None = None) -> None:
        """Stop taking calls, let in-flight ones finish within the drain deadline, then close."""
        self.dispatcher.accepting = False
        if getattr(self, "advertiser", None) is not None:  # agents looking now must not find us
            await self.advertiser.close()
        drain = self.config.drain_s if drain_s is None else drain_s
        deadline = time.monotonic() + drain
        while self.dispatcher.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.dispatcher.in_flight:  # drain ran out: each call still gets its one answer, then we go
            n = self.dispatcher.abort_all(
                f"the coordinator stopped before this call finished (its --drain of {drain:g} s ran out); "
                "the job was cancelled: retry the call against another coordinator or after it restarts")
            log.warning("drain of %g s ran out: answering %d call(s) still in flight as unavailable", drain, n)
            end = time.monotonic() + 2.0
            while self.dispatcher.in_flight and time.monotonic() < end:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)  # let the answers reach the wire
        for a in list(self.agents.values()):
            self.drop_agent(a, "coordinator shutting down")
        if self.gateway is not None:
            await self.gateway.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        for t in self._tasks:
            t.cancel()
        await self.local.close()
        await self.upstream.close()
        if self.presence is not None:
            await self.presence.stop()
        if self.dispatcher.forwarder is not None:
            await self.dispatcher.forwarder.close()
        if self.shared is not None:  # write-behind's queue goes to Redis first
            await self.shared.stop()
        if self.governor is not None:
            self.governor.stop()
        self.calllog.close()
        self.auth.close()
        self._flush_bindings()
        self.store.close()

    def _flush_bindings(self) -> None:
        try:
            self.volunteers.bindings.flush()
        except OSError as exc:
            log.error("could not write the agent key bindings: %s", exc)

    async def run_forever(self) -> None:
        raise_open_files_limit()
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        print(f"coordinator listening on {self.config.listen} (state {self.state.path})", flush=True)
        print(f"key fingerprint {self.state.fingerprint.hex()} (join tokens pin it; clients elsewhere: "
              "--fingerprint or MICROSWARM_FINGERPRINT)", flush=True)
        if self.tls is None:
            print("TLS is OFF (--insecure): credentials and calls travel in cleartext; for a trusted loopback "
                  "only (clients need MICROSWARM_INSECURE=1)", flush=True)
        else:
            what = "bound to that key" if self.tls.bound else "the operator's (--tls-cert)"
            print(f"TLS on gRPC{' and HTTP' if self.gateway is not None else ''}: certificate {what}; clients "
                  f"trust {self.tls.cert_path} (curl --cacert {self.tls.cert_path})", flush=True)
        if self.gateway is not None:
            print(f"HTTP gateway on {self.gateway.url} (docs at {self.gateway.url}/docs, dashboard at "
                  f"{self.gateway.url}/dashboard)", flush=True)
        await self._stopping.wait()
        log.info("stopping: draining %d in-flight calls", self.dispatcher.in_flight)
        await self.stop()
