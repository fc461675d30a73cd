"""Calls sent on to another coordinator of the cluster, whose agents can take them.

A call that arrives at a coordinator where no agent holds its service (none attached, none that
installed it, all in quarantine) would otherwise run on the coordinator's own workers or wait for
an install. When a peer's presence record (presence.py: refreshed every second, on Redis) says its
agents hold that package, the call goes there instead, over gRPC, as the cluster's operator (the
coordinators share one identity: the admin credential and the pinned certificate of the state
directory serve). Local agents first: while one of ours holds the package, even busy, the call
waits in our line; and the first forwarded call of a package also places it on our agents (when
we have any), so the next ones stay here.

Direct gRPC, not Redis Streams, from a measurement (`microswarm bench --coordinators 2`,
bench_forward.py): on one machine's loopback the transport alone costs about the same either way
(a Redis Streams request/reply hop 1.41-1.66 ms p50, a bare gRPC round trip 0.96-1.80 ms, in the
same runs), and sending a call on adds 2.1-2.9 ms in all to a 3.9-6.3 ms call. Across machines a
stream hop is two network round trips each way (caller to Redis, Redis to the peer) where gRPC is
one; each call would be encoded a second time into stream entries; and the peer already speaks the
call protocol with its deadlines, cancellation and large-payload pieces. What Streams would add,
claiming a dead coordinator's pending jobs, the sender does itself: it still holds the call (below).

The request carries `forwarded_by` (the receiving coordinator never sends it on again: one hop at
most, no loops), the original client's name and its token's scope, honoured only on the operator's
credential (`arriving`), so nested calls stay within the client's scope. When the peer cannot be
reached the call runs here (it never left); when the peer went away with the call in flight (its
connection broke, or its presence record lapsed: frozen, cut off), a pure or idempotent call runs
here; any other is answered `outcome_unknown` when the connection breaks, and otherwise waits for
the peer's answer up to its deadline (it must not run twice), as the scheduler does for agents.

Trust: a peer is a coordinator of the same identity (its presence record carries the identity's
fingerprint, and TLS pins the identity itself, so a record someone else wrote to Redis cannot
draw calls, or the operator's credential, to another address). With --insecure (plaintext, a
trusted loopback) calls are only sent to loopback peers.
"""
from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from typing import Any, Callable

from microcores._chunks import STREAM_MIN
from microcores._discovery import is_loopback, split_listen
from microcores._failover import NotSent
from microcores.client import AsyncClient
from microcores.errors import MicroError, OutcomeUnknown, Unavailable
from microswarm.protos import microswarm_pb2 as pb

from .auth import OPERATOR, Token
from .caller import Caller

log = logging.getLogger("microswarm.forward")

DOWN_S = 5.0     # a peer that could not be reached is passed over this long
MAX_PEERS = 2    # peers one call tries before it runs here
GRACE_S = 5.0    # waited past the call's own deadline for the peer's answer
WATCH_S = 0.5    # how often a call in flight on a peer checks that the peer is still live


def peer_address(configured: str, listen: str, port: int) -> str:
    """Where the other coordinators reach this one: --peer-address, else the listen address with
    its real port, a wildcard host replaced by this host's address (its name, resolved)."""
    if configured:
        return configured
    host = split_listen(listen)[0]
    if host in ("", "0.0.0.0", "::", "*"):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def holdings(agents: Any) -> dict[str, int]:
    """For the presence record: each package some agent of ours takes jobs of, and their free slots."""
    out: dict[str, int] = {}
    for a in agents:
        for d in a.holdings:
            if a.holds(d):
                out[d] = out.get(d, 0) + max(0, a.free)
    return out


def arriving(token: Token, req: pb.CallRequest, caller: Caller) -> Caller:
    """The caller of a call as it arrives: a forwarded one (on the operator's credential only) runs
    as its original client, within that client's scope; anyone else cannot claim to be forwarded."""
    if not req.forwarded_by:
        return caller
    if token.client_id != OPERATOR:
        req.ClearField("forwarded_by")
        del req.scopes[:]
        return caller
    scoped = Token(b"", "access", req.client or "anonymous", tuple(req.scopes) or ("*",), float("inf"), "")
    return Caller(f"{req.client or 'anonymous'}"[:80], scoped, f"{caller.address} via {req.forwarded_by}"[:200])


def _loopback(address: str) -> bool:
    """A peer address on loopback (its name not looked up: it came from Redis; a bad port: no)."""
    try:
        return is_loopback(split_listen(address)[0], resolve=False)
    except ValueError:
        return False


class Forwarder:
    """This coordinator's side: which peer takes a call, and the call sent there."""

    def __init__(self, me: str, identity: str, peers: Callable[[], dict[str, dict[str, Any]]], state_dir: str,
                 insecure: bool, own_cert: bool = False) -> None:
        self.me = me
        # The cluster's key fingerprint (hex): peers prove it over TLS, as agents' tokens pin it. With
        # the operator's own certificate (--tls-cert, not bound to the identity) peers are trusted as
        # clients trust that coordinator: its chain in the state directory, or the system's CAs.
        self.identity = "" if own_cert else identity
        self.fingerprint = identity[:16]  # as presence records carry it: another cluster's are not peers
        self.peers = peers            # presence.Presence.peers: id -> record, as last read
        self.state_dir = state_dir
        self.insecure = insecure
        self._clients: dict[str, AsyncClient] = {}
        self._down: dict[str, float] = {}  # peer id -> monotonic time until which it is passed over
        self._closing: set[asyncio.Task[None]] = set()
        self.counts = {"forwarded": 0, "received": 0, "fell_back": 0}

    def pick(self, digest: str, tried: set[str]) -> tuple[str, str] | None:
        """(id, address) of a live peer whose agents hold `digest`: the most free slots first."""
        now, wall = time.monotonic(), time.time()
        best: list[tuple[str, str]] = []
        most = -1
        for ident, rec in self.peers().items():
            if ident == self.me or ident in tried or self._down.get(ident, 0.0) > now \
                    or rec.get("fingerprint") != self.fingerprint:
                continue
            free = (rec.get("holds") or {}).get(digest)
            address = rec.get("peer") or ""
            if free is None or not address or wall - float(rec.get("seen", 0)) > float(rec.get("ttl_s", 3.0)):
                continue
            if self.insecure and not _loopback(address):
                continue  # plaintext: whoever can write to Redis could name any address (module docstring)
            if free > most:
                best, most = [(ident, address)], free
            elif free == most:
                best.append((ident, address))
        return random.choice(best) if best else None

    def _client(self, address: str) -> AsyncClient:
        client = self._clients.get(address)
        if client is None:
            # Pinned to the cluster's identity, not to this state directory's certificate: each
            # coordinator may have made its own certificate (its host name), bound to that identity.
            client = self._clients[address] = AsyncClient(
                address, client_name=f"coordinator:{self.me}", state_dir=self.state_dir,
                insecure=self.insecure, fingerprint=None if self.insecure else (self.identity or None))
        return client

    async def send(self, req: pb.CallRequest, raw_input: bytes, caller: Caller, digest: str,
                   rerunnable: bool, budget: float) -> pb.CallReply | None:
        """The peer's reply, or None when no peer took the call (it never left: run it here)."""
        tried: set[str] = set()
        while len(tried) < MAX_PEERS:
            peer = self.pick(digest, tried)
            if peer is None:
                break
            ident, address = peer
            tried.add(ident)
            out = pb.CallRequest(service=req.service, encoding=req.encoding, deadline_s=req.deadline_s,
                                 client=caller.client, forwarded_by=self.me,
                                 scopes=list(caller.token.scopes) if caller.token is not None else ["*"])
            payload = None
            if req.encoding == pb.MSGPACK and len(raw_input) > STREAM_MIN:
                out.input_size, payload = len(raw_input), raw_input
            else:
                out.input = raw_input
            try:
                reply = await self._watched(ident, address, out, payload, budget + GRACE_S, rerunnable)
            except NotSent as exc:
                self._passed_over(ident, address, exc)
                continue
            except Unavailable as exc:
                self._passed_over(ident, address, exc)
                if not rerunnable:
                    raise OutcomeUnknown(f"{req.service}: coordinator {ident}, whose agent was running it, went "
                                         "away; it may or may not have run (its service is neither pure nor "
                                         "idempotent, so it is not run again)") from None
                continue
            except MicroError as exc:  # (deadline_exceeded: the call's time is up wherever it runs)
                if exc.code == "untrusted_coordinator":
                    self._passed_over(ident, address, exc)
                    continue
                raise
            self.counts["forwarded"] += 1
            reply.coordinator = reply.coordinator or ident
            reply.ClearField("result_size")  # (its pieces are in `result` by now)
            return reply
        if tried:
            self.counts["fell_back"] += 1
        return None

    async def _watched(self, ident: str, address: str, out: pb.CallRequest, payload: bytes | None,
                       timeout: float, rerunnable: bool) -> pb.CallReply:
        """The peer's answer; for a call that may run again, given up on (Unavailable) once the
        peer's presence record lapses: a frozen or partitioned peer holds it no longer than its TTL."""
        task = asyncio.ensure_future(self._client(address).send(out, payload, timeout))
        if not rerunnable:
            return await task
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=WATCH_S)
                if done:
                    return task.result()
                if not self._live(ident):
                    raise Unavailable(f"coordinator {ident} stopped refreshing its presence record (frozen, cut "
                                      "off or gone) with the call in flight")
        finally:
            if not task.done():
                task.cancel()  # (its job stops on the peer, if the peer still hears)

    def _live(self, ident: str) -> bool:
        rec = self.peers().get(ident)
        return rec is not None and time.time() - float(rec.get("seen", 0)) <= float(rec.get("ttl_s", 3.0))

    def _passed_over(self, ident: str, address: str, exc: Exception) -> None:
        """A peer that failed us is passed over a while; the next call to it makes a new channel
        (and pins its certificate anew: a restarted coordinator may have made another)."""
        self._down[ident] = time.monotonic() + DOWN_S
        client = self._clients.pop(address, None)
        if client is not None:
            closing = asyncio.get_running_loop().create_task(client.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        log.warning("coordinator %s did not take a call sent on to it (%s); passed over for %g s", ident, exc, DOWN_S)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
