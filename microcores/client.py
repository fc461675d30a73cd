"""Calling services from Python: `Client` (blocking) and `AsyncClient` (asyncio), and `publish`.

    from microcores import Client
    with Client("127.0.0.1:7070", client_id="msc_...", client_secret="...") as c:
        c.call("math.compute", {"a": 2, "b": 3, "op": "mul"})   # {'result': 6.0}

Every call carries a bearer token, which the client gets and renews by itself over gRPC:
with `client_id` and `client_secret` (or MICROSWARM_CLIENT_ID and MICROSWARM_CLIENT_SECRET),
or else with the operator's admin credential found in the coordinator's state directory
(`state_dir`, MICROSWARM_STATE_DIR, or the default one), as the CLI and the demo do.

`call` returns the result or raises the MicroError the envelope carries; `envelope` returns
the whole answer (who ran it, how long it took, whether it came from the cache).
"""
from __future__ import annotations

import asyncio
import getpass
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections import deque
from typing import Any, AsyncIterator, Iterable, Iterator, cast

import grpc
from grpc import aio

from microswarm.protos import microswarm_pb2 as pb
from microswarm.protos import microswarm_pb2_grpc as pbg

from . import _codec, _tls
from ._chunks import STREAM_MIN, Assembler, ResultPieces, batch_parts, call_pieces, pieces
from ._failover import Cluster, NotSent, never_sent
from .handles import AsyncCallHandle, CallHandle, envelope_of, rpc_error, wait_envelope, wait_envelope_async
from .errors import DeadlineExceeded, MicroError, Unauthorized, Unavailable, from_code

DEFAULT_COORDINATOR = "127.0.0.1:7070"
# How long past a call's own deadline a client still waits for the coordinator's answer (which
# normally comes at the deadline, as `deadline_exceeded`) before it gives up on its own.
DEADLINE_GRACE_S = 5.0
CALLS_FIELD = pb.CallBatch.DESCRIPTOR.fields_by_name["calls"].number

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", _codec.MAX_PAYLOAD + (1 << 20)),
                   ("grpc.max_send_message_length", _codec.MAX_PAYLOAD + (1 << 20))]


def default_coordinator() -> str:
    return os.environ.get("MICROSWARM_COORDINATOR") or DEFAULT_COORDINATOR


def default_client_name() -> str:
    try:
        return f"python:{getpass.getuser()}"
    except (KeyError, OSError):
        return "python"


@dataclass
class Envelope:
    """The answer to one call, the same over gRPC and HTTP."""

    status: str
    result: Any = None
    error: dict[str, str] | None = None
    executed_by: str = ""
    attempts: int = 0
    process_time_ms: float = 0.0
    cache_hit: bool = False
    service: str = ""
    version: str = ""
    verified: bool = False   # a second executor agreed, or the coordinator computed it (--verify)
    extra: dict[str, Any] = field(default_factory=dict)
    call_id: str = ""        # the coordinator's id of the call (Client.result fetches submitted ones by it)
    upstream_status: int = 0  # a route's call (executed_by "upstream"): the source's HTTP status
    coordinator: str = ""    # sent on to this coordinator of the cluster, whose agent ran it; "": the one asked

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def unwrap(self) -> Any:
        if self.ok:
            return self.result
        e = self.error or {}
        raise from_code(e.get("code", "error"), e.get("message", ""), e.get("field", ""), e.get("details", ""))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"status": self.status}
        if self.ok:
            d["result"] = self.result
        else:
            d["error"] = self.error
        d.update(executed_by=self.executed_by, attempts=self.attempts,
                 process_time_ms=round(self.process_time_ms, 3), cache_hit=self.cache_hit,
                 verified=self.verified, service=self.service, version=self.version)
        if self.call_id:
            d["call_id"] = self.call_id
        if self.upstream_status:
            d["upstream_status"] = self.upstream_status
        if self.coordinator:
            d["coordinator"] = self.coordinator
        return d

    @classmethod
    def from_reply(cls, reply: pb.CallReply) -> "Envelope":
        result: Any = None
        error = None
        if reply.status == "ok":
            result = json.loads(reply.result) if reply.encoding == pb.JSON else _codec.unpack(reply.result)
        else:
            error = {"code": reply.error.code, "message": reply.error.message}
            if reply.error.field:
                error["field"] = reply.error.field
            if reply.error.details:  # a service_error's traceback within its package
                error["details"] = reply.error.details
        return cls(reply.status, result, error, reply.executed_by, reply.attempts, reply.process_time_ms,
                   reply.cache_hit, reply.service, reply.version, reply.verified, call_id=reply.call_id,
                   upstream_status=reply.upstream_status, coordinator=reply.coordinator)


def _encode(data: Any, encoding: int) -> bytes:
    if encoding == pb.JSON:
        raw = data if isinstance(data, (bytes, str)) else _codec.dumps_json(data)
        return raw.encode() if isinstance(raw, str) else raw
    if hasattr(data, "model_dump"):
        data = data.model_dump(mode="python")
    return _codec.pack(data)


def _request(service: str, data: Any, encoding: int, timeout: float | None) -> pb.CallRequest:
    # (the generated .pyi wants the enum type; protobuf takes its plain int)
    return pb.CallRequest(service=service, input=_encode(data, encoding), encoding=cast(pb.Encoding, encoding),
                          deadline_s=timeout or 0.0)


def _streamed_request(service: str, data: Any, encoding: int,
                      timeout: float | None) -> tuple[pb.CallRequest, bytes | None]:
    """A call for CallStream: an msgpack input past STREAM_MIN goes apart from the request, as
    pieces of the call that the coordinator passes on while they arrive (docs/design.md)."""
    raw = _encode(data, encoding)
    if encoding == pb.MSGPACK and len(raw) > STREAM_MIN:
        return pb.CallRequest(service=service, input_size=len(raw), encoding=cast(pb.Encoding, encoding),
                              deadline_s=timeout or 0.0), raw
    return pb.CallRequest(service=service, input=raw, encoding=cast(pb.Encoding, encoding),
                          deadline_s=timeout or 0.0), None


def _wait_for(timeout: float | None) -> float | None:
    """How long a client waits for the answer to a call with this deadline (None: no limit)."""
    return (timeout + DEADLINE_GRACE_S) if timeout else None


def _deadline_exceeded(target: str, service: str, timeout: float | None) -> DeadlineExceeded:
    if not timeout:
        return DeadlineExceeded(f"no answer from the coordinator at {target} for {service} in time")
    return DeadlineExceeded(f"no answer from the coordinator at {target} for {service} within its "
                            f"{timeout:g} s deadline (waited {timeout + DEADLINE_GRACE_S:g} s)")


def _unavailable(exc: grpc.RpcError, target: str, service: str = "", timeout: float | None = None) -> MicroError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and _tls.handshake_failed(details or ""):
        return _tls.UntrustedCoordinator(
            f"the coordinator at {target} did not prove the key this client pins (TLS: {_tls.handshake_reason(details or '')}); "
            "nothing was sent. Check the address, and the pin: the state directory's coordinator.crt or "
            "--fingerprint / MICROSWARM_FINGERPRINT (MICROSWARM_INSECURE=1 if it runs with --insecure)")
    if code == grpc.StatusCode.UNAVAILABLE:
        # NotSent: no connection was made, so nothing reached anyone (another coordinator may take it)
        return (NotSent if never_sent(details or "") else Unavailable)(
            f"cannot reach the coordinator at {target}: is it running? (set --coordinator or MICROSWARM_COORDINATOR)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        if service:
            return _deadline_exceeded(target, service, timeout)
        return from_code("deadline_exceeded", f"no answer from the coordinator at {target} in time")
    return from_code("unavailable" if code is None else code.name.lower(), details or str(exc))


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.environ.get("MICROSWARM_STATE_DIR") or os.path.join(base, "microswarm")


REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)


class _Tokens:
    """Where a client's bearer tokens come from, and the current one.

    A fixed `bearer` is used as it is. Otherwise: the client's id and secret, or the operator's
    admin credential from the state directory; the access token is renewed a little before it
    expires (with the refresh token when there is one) and at once when a call is refused as
    unauthenticated (refused calls were never dispatched, so the call is simply sent again)."""

    def __init__(self, client_id: str | None, client_secret: str | None, bearer: str | None,
                 state_dir: str | os.PathLike[str] | None, scope: str | None) -> None:
        self.static = bearer
        self.client_id = client_id or (None if bearer else os.environ.get("MICROSWARM_CLIENT_ID"))
        self.client_secret = client_secret or (os.environ.get("MICROSWARM_CLIENT_SECRET", "")
                                               if self.client_id else "")
        self.scope = scope or ""
        self.admin: str | None = None
        self._state_dir = state_dir
        self.load_admin()
        self.access: str | None = bearer
        self.refresh = ""
        self.renew_at = float("inf") if bearer else 0.0
        self.lock = threading.Lock()

    def load_admin(self) -> str | None:
        """The admin credential of the state directory, when this client has no other credentials
        (read again until found: a client made before its coordinator first started finds it later)."""
        if self.admin is None and not self.static and not self.client_id:
            try:
                self.admin = admin_credential(self._state_dir or default_state_dir())
            except PermissionError:
                pass
        return self.admin

    @property
    def can_mint(self) -> bool:
        return bool(self.client_id or self.admin)

    def valid(self) -> str | None:
        if self.access and time.monotonic() < self.renew_at:
            return self.access
        return None

    def requests(self) -> list[tuple[pb.TokenRequest, list[tuple[str, str]]]]:
        out: list[tuple[pb.TokenRequest, list[tuple[str, str]]]] = []
        if self.refresh and self.client_id:
            out.append((pb.TokenRequest(grant_type="refresh_token", client_id=self.client_id,
                                        client_secret=self.client_secret, refresh_token=self.refresh), []))
        if self.client_id:
            out.append((pb.TokenRequest(grant_type="client_credentials", client_id=self.client_id,
                                        client_secret=self.client_secret, scope=self.scope), []))
        elif self.admin:
            out.append((pb.TokenRequest(grant_type="client_credentials"), [("authorization", f"Admin {self.admin}")]))
        return out

    def accept(self, reply: pb.TokenReply) -> str:
        ttl = reply.expires_in or 3600.0
        self.access, self.refresh = reply.access_token, reply.refresh_token
        self.renew_at = time.monotonic() + ttl - min(60.0, ttl / 10)
        return reply.access_token

    def invalidate(self) -> None:
        if self.static is None:
            self.renew_at = 0.0

    def explain(self, reply: pb.CallReply) -> pb.CallReply:
        """A refusal of a client that had nothing to get a token with says where credentials come from."""
        if _refused_unauthenticated(reply) and not self.can_mint and self.static is None:
            reply.error.message += (" (this client has no credentials: pass client_id and client_secret, set "
                                    "MICROSWARM_CLIENT_ID and MICROSWARM_CLIENT_SECRET, or run where the "
                                    "coordinator's state directory is readable: --state-dir or MICROSWARM_STATE_DIR)")
        return reply

    def no_token(self, exc: grpc.RpcError | None) -> MicroError:
        why = exc.details() if exc is not None and hasattr(exc, "details") else ""
        return Unauthorized(f"could not get a token from the coordinator: {why or 'refused'}")


def _refused_unauthenticated(reply: pb.CallReply) -> bool:
    return reply.status == "error" and reply.error.code == "unauthenticated"


class Client:
    def __init__(self, coordinator: str | None = None, *, client_name: str | None = None,
                 bearer: str | None = None, client_id: str | None = None, client_secret: str | None = None,
                 state_dir: str | os.PathLike[str] | None = None, scope: str | None = None,
                 fingerprint: str | None = None, insecure: bool | None = None) -> None:
        self._cluster = Cluster(coordinator or default_coordinator())  # one, or several of one cluster
        self._pin = _Pin(fingerprint, state_dir, insecure)
        self._channel: grpc.Channel | None = None
        self._stub_: pbg.CoordinatorStub | None = None
        self._metadata = [("x-client", client_name or default_client_name())]
        self._tokens = _Tokens(client_id, client_secret, bearer, state_dir, scope)

    @property
    def target(self) -> str:
        """The coordinator in use (of those given: the next one once it cannot be reached)."""
        return self._cluster.target

    @property
    def _stub(self) -> pbg.CoordinatorStub:
        """The channel opens at first use, once the coordinator's key is pinned (no credential goes before)."""
        if self._stub_ is None:
            try:
                trust = _tls.resolve(self.target, **self._pin.kwargs())
            except Unavailable as exc:
                raise NotSent(exc.message) from None
            self._channel = trust.channel(self.target, CHANNEL_OPTIONS)
            self._stub_ = pbg.CoordinatorStub(self._channel)
        return self._stub_

    def _move_on(self, failed: str) -> None:
        """To the next coordinator of the cluster (the one in use could not be reached)."""
        if self._cluster.advance(failed):
            if self._channel is not None:
                self._channel.close()
            self._channel, self._stub_ = None, None

    def token(self) -> str | None:
        """A valid access token (fetched or renewed when needed); None when there are no credentials."""
        tok = self._tokens.valid()
        if tok or not self._tokens.can_mint:
            return tok or self._tokens.access
        with self._tokens.lock:
            tok = self._tokens.valid()
            if tok:
                return tok
            last: grpc.RpcError | None = None
            for req, md in self._tokens.requests():
                try:
                    return self._tokens.accept(self._stub.Token(req, metadata=md, timeout=15))
                except grpc.RpcError as exc:
                    if exc.code() not in REFUSED:
                        raise _unavailable(exc, self.target) from None
                    last = exc
                    if req.grant_type == "refresh_token":
                        self._tokens.refresh = ""
            raise self._tokens.no_token(last)

    def _call_metadata(self) -> list[tuple[str, str]]:
        tok = self.token()
        return self._metadata + [("authorization", f"Bearer {tok}")] if tok else self._metadata

    def envelope(self, service: str, data: Any = None, *, timeout: float | None = None,
                 encoding: int = pb.MSGPACK) -> Envelope:
        req = _request(service, {} if data is None else data, encoding, timeout)
        renewed, moves = False, 0
        while True:
            target = self.target
            try:
                reply = self._one(req, timeout)
            except Unavailable as exc:  # its coordinator cannot be reached: another of the cluster may do
                self._cluster.move_or_raise(exc, service, target, moves)
                moves += 1
                self._move_on(target)
                continue
            self._cluster.learn(service, reply.rerunnable)
            if not renewed and _refused_unauthenticated(reply) and self._tokens.can_mint:
                self._tokens.invalidate()  # expired or revoked under us: a new token, once
                renewed = True
                continue
            return Envelope.from_reply(self._tokens.explain(reply))

    def _one(self, req: pb.CallRequest, timeout: float | None) -> pb.CallReply:
        fut = self._stub.Call.future(req, timeout=_wait_for(timeout), metadata=self._call_metadata())
        try:
            reply: pb.CallReply = fut.result()
            return reply
        except grpc.RpcError as exc:
            raise _unavailable(exc, self.target, req.service, timeout) from None
        except BaseException:  # Ctrl-C (KeyboardInterrupt) among them: the RPC, hence the job, is cancelled
            fut.cancel()
            raise

    def call(self, service: str, data: Any = None, *, timeout: float | None = None) -> Any:
        return self.envelope(service, data, timeout=timeout).unwrap()

    def _viewer_metadata(self) -> list[tuple[str, str]]:
        """Status and CacheStats: the admin credential when this client read one from the state
        directory (the operator's full view), else its bearer token (a client whose scope covers
        `status` sees volunteers redacted), else nothing (refused)."""
        if self._tokens.load_admin():
            return self._metadata + [("authorization", f"Admin {self._tokens.admin}")]
        return self._call_metadata()

    def _viewer_rpc(self, method: str, request: Any, timeout: float) -> Any:
        """A read (Status, CacheStats): safe to ask any coordinator of the cluster, so on to the next."""
        for moves in range(len(self._cluster.targets)):
            target = self.target
            try:
                return self._viewer_rpc_once(method, request, timeout)
            except Unavailable:
                if moves == len(self._cluster.targets) - 1:
                    raise
                self._move_on(target)

    def _viewer_rpc_once(self, method: str, request: Any, timeout: float) -> Any:
        for attempt in (1, 2):
            try:
                return getattr(self._stub, method)(request, timeout=timeout, metadata=self._viewer_metadata())
            except grpc.RpcError as exc:
                if attempt == 1 and exc.code() == grpc.StatusCode.UNAUTHENTICATED and not self._tokens.admin \
                        and self._tokens.can_mint:
                    self._tokens.invalidate()  # expired or revoked under us: a new token, once
                    continue
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise Unauthorized(exc.details() or str(exc.code())) from None
                raise _unavailable(exc, self.target) from None

    def status(self, recent_calls: int = 20, timeout: float = 10, agents_limit: int = 0,
               agents_offset: int = 0) -> pb.StatusReply:
        """The coordinator's status: needs the operator's credential (full view) or a client token
        whose scope covers `status` (volunteers' ids and addresses hidden: `redacted`). With
        `agents_limit`, one page of the agents by id (`agents_total` counts them all)."""
        req = pb.StatusRequest(recent_calls=recent_calls, agents_limit=agents_limit, agents_offset=agents_offset)
        reply: pb.StatusReply = self._viewer_rpc("Status", req, timeout)
        return reply

    def cache_stats(self, timeout: float = 10) -> dict[str, Any]:
        reply = self._viewer_rpc("CacheStats", pb.CacheStatsRequest(), timeout)
        stats: dict[str, Any] = json.loads(reply.json or b"{}")
        return stats

    # ------------------------------------------------------------ submit now, fetch later, map

    def submit(self, service: str, data: Any = None, *, timeout: float | None = None,
               encoding: int = pb.MSGPACK) -> CallHandle:
        """Start a call and return its handle at once; the call runs on even if this process goes."""
        req = _request(service, {} if data is None else data, encoding, timeout)
        for attempt in (1, 2):
            try:
                r = self._stub.Submit(req, metadata=self._call_metadata(), timeout=30)
                return CallHandle(self, r.call_id, service)
            except grpc.RpcError as exc:
                if attempt == 1 and exc.code() == grpc.StatusCode.UNAUTHENTICATED and self._tokens.can_mint:
                    self._tokens.invalidate()
                    continue
                raise rpc_error(exc, self.target) from None
        raise AssertionError("unreachable")

    def _fetch(self, call_id: str, wait_s: float) -> Envelope | None:
        return envelope_of(self._result_reply(call_id, wait_s))

    def _result_reply(self, call_id: str, wait_s: float) -> pb.ResultReply:
        try:
            r: pb.ResultReply = self._stub.Result(pb.ResultRequest(call_id=call_id, wait_s=wait_s),
                                                  timeout=wait_s + 30, metadata=self._call_metadata())
        except grpc.RpcError as exc:
            raise rpc_error(exc, self.target) from None
        return r

    def result(self, call_id: str, *, timeout: float | None = None) -> Envelope:
        """The envelope of a submitted call of this client (from any process), waiting up to
        `timeout` s for it to end (None: as long as it takes); UnknownCall once it has expired."""
        return wait_envelope(self._fetch, call_id, timeout)

    def cancel(self, call_id: str) -> Envelope | None:
        """Stop a submitted call; its envelope (`cancelled`, or what it had already answered)."""
        try:
            r = self._stub.Cancel(pb.CancelRequest(call_id=call_id), timeout=30, metadata=self._call_metadata())
        except grpc.RpcError as exc:
            raise rpc_error(exc, self.target) from None
        return envelope_of(r)

    def map(self, service: str, inputs: Iterable[Any], *, concurrency: int = 16, timeout: float | None = None,
            envelopes: bool = False) -> Iterator[Any]:
        """Results (or envelopes) of `service` over `inputs`, in order, with at most `concurrency`
        calls in flight. Without `envelopes`, the first failed call raises its error there."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        window: deque[tuple[pb.CallRequest, Any]] = deque()

        def launch(data: Any) -> None:
            req = _request(service, {} if data is None else data, pb.MSGPACK, timeout)
            window.append((req, self._stub.Call.future(req, timeout=_wait_for(timeout),
                                                       metadata=self._call_metadata())))

        def take() -> Any:
            req, fut = window.popleft()
            try:
                reply = fut.result()
            except grpc.RpcError as exc:
                raise _unavailable(exc, self.target, req.service, timeout) from None
            env = Envelope.from_reply(self._tokens.explain(reply))
            return env if envelopes else env.unwrap()

        try:
            for data in inputs:
                launch(data)
                if len(window) >= concurrency:
                    yield take()
            while window:
                yield take()
        finally:
            for _, fut in window:  # given up on (an error raised, or the caller stopped iterating)
                fut.cancel()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of Client, for many calls in flight.

    By default its calls share one multiplexed stream (`CallStream`), batched both ways: far
    cheaper per call than one RPC each when many are in flight. `multiplex=False` uses `Call`.

    Cancelling the task that awaits a call (or the call's deadline passing with no answer, which
    raises DeadlineExceeded) cancels the call: its job stops on the agent or the coordinator.
    """

    def __init__(self, coordinator: str | None = None, *, client_name: str | None = None,
                 bearer: str | None = None, multiplex: bool = True, client_id: str | None = None,
                 client_secret: str | None = None, state_dir: str | os.PathLike[str] | None = None,
                 scope: str | None = None, fingerprint: str | None = None, insecure: bool | None = None) -> None:
        self._cluster = Cluster(coordinator or default_coordinator())  # one, or several of one cluster
        self._pin = _Pin(fingerprint, state_dir, insecure)
        self._channel: aio.Channel | None = None
        self._stub: Any = None  # opened by _ready(), once the coordinator's key is pinned
        self._metadata = [("x-client", client_name or default_client_name())]
        self._tokens = _Tokens(client_id, client_secret, bearer, state_dir, scope)
        self._token_lock: asyncio.Lock | None = None
        self._sent_token: str | None = None
        self.multiplex = multiplex
        self._stream: asyncio.Task[None] | None = None
        self._call: Any = None
        self._pending: dict[int, asyncio.Future[pb.CallReply]] = {}
        self._queue: asyncio.Queue[tuple[int, pb.CallRequest | None, bytes | None]] = asyncio.Queue()
        self._results = ResultPieces()
        self._next_id = 0

    @property
    def target(self) -> str:
        """The coordinator in use (of those given: the next one once it cannot be reached)."""
        return self._cluster.target

    async def _ready(self) -> None:
        if self._stub is None:
            try:
                trust = await _tls.resolve_async(self.target, **self._pin.kwargs())
            except Unavailable as exc:
                raise NotSent(exc.message) from None
            if self._stub is None:
                self._channel = trust.aio_channel(self.target, CHANNEL_OPTIONS)
                self._stub = pbg.CoordinatorStub(self._channel)

    async def _move_on(self, failed: str) -> None:
        """To the next coordinator of the cluster (the one in use could not be reached)."""
        if self._cluster.advance(failed):
            channel, self._channel, self._stub = self._channel, None, None
            if self._stream is not None:
                self._stream.cancel()
                self._stream = None
            if channel is not None:
                await channel.close()

    async def token(self) -> str | None:
        """A valid access token (fetched or renewed when needed); None when there are no credentials."""
        await self._ready()
        tok = self._tokens.valid()
        if tok or not self._tokens.can_mint:
            return tok or self._tokens.access
        if self._token_lock is None:
            self._token_lock = asyncio.Lock()
        async with self._token_lock:
            tok = self._tokens.valid()
            if tok:
                return tok
            last: grpc.RpcError | None = None
            for req, md in self._tokens.requests():
                try:
                    return self._tokens.accept(await self._stub.Token(req, metadata=md, timeout=15))
                except grpc.RpcError as exc:
                    if exc.code() not in REFUSED:
                        raise _unavailable(exc, self.target) from None
                    last = exc
                    if req.grant_type == "refresh_token":
                        self._tokens.refresh = ""
            raise self._tokens.no_token(last)

    async def envelope(self, service: str, data: Any = None, *, timeout: float | None = None,
                       encoding: int = pb.MSGPACK) -> Envelope:
        req, payload = (_streamed_request(service, {} if data is None else data, encoding, timeout)
                        if self.multiplex else (_request(service, {} if data is None else data, encoding, timeout), None))
        renewed, moves = False, 0
        while True:
            target = self.target
            try:
                reply = await self._one(req, timeout, payload)
            except Unavailable as exc:  # its coordinator cannot be reached: another of the cluster may do
                self._cluster.move_or_raise(exc, service, target, moves)
                moves += 1
                await self._move_on(target)
                continue
            self._cluster.learn(service, reply.rerunnable)
            if not renewed and _refused_unauthenticated(reply) and self._tokens.can_mint:
                self._tokens.invalidate()  # expired or revoked under us: a new token, once
                renewed = True
                continue
            return Envelope.from_reply(self._tokens.explain(reply))

    async def send(self, req: pb.CallRequest, payload: bytes | None = None,
                   timeout: float | None = None) -> pb.CallReply:
        """One request as it is, and its reply as it came: no other coordinator, no resend (but once
        with a new token when it was refused for an expired one). For a coordinator sending a call on
        to another of its cluster (coordinator/forward.py). `payload`: a large input that goes as
        pieces after the request (its `input_size`); multiplexed clients only."""
        reply = await self._one(req, timeout, payload)
        if _refused_unauthenticated(reply) and self._tokens.can_mint:
            self._tokens.invalidate()
            reply = await self._one(req, timeout, payload)
        return reply

    async def _one(self, req: pb.CallRequest, timeout: float | None, payload: bytes | None = None) -> pb.CallReply:
        tok = await self.token()
        if not self.multiplex:
            md = self._metadata + [("authorization", f"Bearer {tok}")] if tok else self._metadata
            try:  # cancelling the awaiting task cancels the RPC (grpc.aio does), hence the job
                reply: pb.CallReply = await self._stub.Call(req, timeout=_wait_for(timeout), metadata=md)
                return reply
            except grpc.RpcError as exc:
                raise _unavailable(exc, self.target, req.service, timeout) from None
        if self._stream is None or self._stream.done():
            self._open_stream(tok)
        self._next_id += 1
        cid = self._next_id
        fut: asyncio.Future[pb.CallReply] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        queue = self._queue  # the stream this call goes on: its cancel goes there too
        queue.put_nowait((cid, req, payload))
        try:
            return await asyncio.wait_for(fut, _wait_for(timeout))
        except asyncio.TimeoutError:
            raise _deadline_exceeded(self.target, req.service, timeout) from None
        finally:
            self._pending.pop(cid, None)
            if not fut.done() or fut.cancelled():
                # Given up on (task cancelled, or no answer in time): the coordinator stops its job.
                queue.put_nowait((cid, None, None))
            self._results.pop(cid)

    def _open_stream(self, tok: str | None) -> None:
        queue = self._queue = asyncio.Queue()
        self._sent_token = tok
        md = self._metadata + [("authorization", f"Bearer {tok}")] if tok else self._metadata
        call = self._stub.CallStream(metadata=md)
        self._call = call

        async def writer() -> None:
            unsent: set[int] = set()  # calls given up on before they were sent: never sent at all
            while True:
                cid, req, payload = await queue.get()
                await asyncio.sleep(0)  # calls issued together share one write
                batch = pb.CallBatch()
                calls: list[bytes] = []  # serialized once, not copied into the batch (see batch_parts)
                inputs: list[tuple[int, bytes]] = []  # large inputs: their pieces follow the batch
                size = 0
                while True:
                    if req is None:  # a call the client gave up on: its job stops
                        if cid in unsent:
                            unsent.discard(cid)
                        else:
                            batch.cancel.append(cid)
                            size += 16
                    elif cid in self._pending:
                        batch.ids.append(cid)
                        calls.append(req.SerializeToString())
                        size += len(req.input) + 64
                        if payload is not None:
                            inputs.append((cid, payload))
                            size += len(payload)
                    else:
                        unsent.add(cid)
                    if size > (1 << 20) or queue.empty():
                        break
                    cid, req, payload = queue.get_nowait()
                if self._tokens.access != self._sent_token and self._tokens.access:
                    self._sent_token = self._tokens.access  # renewed: the stream takes the new token
                    batch.authorization = f"Bearer {self._sent_token}"
                if not (batch.ids or batch.cancel or batch.authorization):
                    continue
                for chunk in pieces(batch_parts(batch.SerializeToString(), CALLS_FIELD, calls)):
                    await call.write(chunk)
                for cid, payload in inputs:  # (the coordinator passes each piece on as it comes)
                    for chunk in call_pieces(cid, payload):
                        await call.write(chunk)

        async def reader() -> None:
            assembler = Assembler()
            results = self._results = ResultPieces()
            try:
                while True:
                    chunk = await call.read()
                    if not isinstance(chunk, pb.StreamChunk):
                        raise ConnectionError("the coordinator closed the call stream")
                    if chunk.call:  # a piece of a large result, ahead of its reply
                        if chunk.call in self._pending:
                            results.take(chunk)
                        continue
                    data = assembler.feed(chunk)
                    if data is None:
                        continue
                    batch = pb.ReplyBatch.FromString(data)
                    for cid, reply in zip(batch.ids, batch.replies):
                        fut = self._pending.get(cid)
                        results.complete(cid, reply)
                        if fut is not None and not fut.done():
                            fut.set_result(reply)
            except (grpc.RpcError, ConnectionError) as exc:
                err = _unavailable(exc, self.target) if isinstance(exc, grpc.RpcError) else Unavailable(str(exc))
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(err)
            finally:
                w.cancel()

        w = asyncio.get_running_loop().create_task(writer())
        self._stream = asyncio.get_running_loop().create_task(reader())

    async def call(self, service: str, data: Any = None, *, timeout: float | None = None) -> Any:
        return (await self.envelope(service, data, timeout=timeout)).unwrap()

    # ------------------------------------------------------------ submit now, fetch later, map

    async def submit(self, service: str, data: Any = None, *, timeout: float | None = None,
                     encoding: int = pb.MSGPACK) -> AsyncCallHandle:
        req = _request(service, {} if data is None else data, encoding, timeout)
        for attempt in (1, 2):
            md = await self._md()
            try:
                r = await self._stub.Submit(req, metadata=md, timeout=30)
                return AsyncCallHandle(self, r.call_id, service)
            except grpc.RpcError as exc:
                if attempt == 1 and exc.code() == grpc.StatusCode.UNAUTHENTICATED and self._tokens.can_mint:
                    self._tokens.invalidate()
                    continue
                raise rpc_error(exc, self.target) from None
        raise AssertionError("unreachable")

    async def _md(self) -> list[tuple[str, str]]:
        tok = await self.token()
        return self._metadata + [("authorization", f"Bearer {tok}")] if tok else self._metadata

    async def _fetch(self, call_id: str, wait_s: float) -> Envelope | None:
        return envelope_of(await self._result_reply(call_id, wait_s))

    async def _result_reply(self, call_id: str, wait_s: float) -> pb.ResultReply:
        md = await self._md()
        try:
            r: pb.ResultReply = await self._stub.Result(pb.ResultRequest(call_id=call_id, wait_s=wait_s),
                                                        timeout=wait_s + 30, metadata=md)
        except grpc.RpcError as exc:
            raise rpc_error(exc, self.target) from None
        return r

    async def result(self, call_id: str, *, timeout: float | None = None) -> Envelope:
        return await wait_envelope_async(self._fetch, call_id, timeout)

    async def cancel(self, call_id: str) -> Envelope | None:
        md = await self._md()
        try:
            r = await self._stub.Cancel(pb.CancelRequest(call_id=call_id), timeout=30, metadata=md)
        except grpc.RpcError as exc:
            raise rpc_error(exc, self.target) from None
        return envelope_of(r)

    async def map(self, service: str, inputs: Iterable[Any], *, concurrency: int = 64,
                  timeout: float | None = None, envelopes: bool = False) -> AsyncIterator[Any]:
        """Results (or envelopes) in order, at most `concurrency` calls in flight."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        window: deque[asyncio.Task[Envelope]] = deque()
        try:
            for data in inputs:
                window.append(asyncio.ensure_future(self.envelope(service, data, timeout=timeout)))
                if len(window) >= concurrency:
                    env = await window.popleft()
                    yield env if envelopes else env.unwrap()
            while window:
                env = await window.popleft()
                yield env if envelopes else env.unwrap()
        finally:
            for t in window:
                t.cancel()

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass(frozen=True)
class _Pin:
    """Where a client's trust in the coordinator comes from (microcores._tls.resolve)."""

    fingerprint: str | None
    state_dir: str | os.PathLike[str] | None
    insecure: bool | None

    def kwargs(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "state_dir": self.state_dir or default_state_dir(),
                "insecure": self.insecure}


def admin_credential(state_dir: str | os.PathLike[str]) -> str:
    p = Path(state_dir).expanduser() / "admin.token"
    try:
        return p.read_text().strip()
    except OSError:
        raise PermissionError(f"no admin credential at {p}: publishing needs the coordinator's state "
                              "directory (--state-dir or MICROSWARM_STATE_DIR)") from None


def publish(target: Any, *, coordinator: str | None = None, state_dir: str | os.PathLike[str] | None = None,
            sign_with: str | os.PathLike[str] | None = None, fingerprint: str | None = None,
            insecure: bool | None = None) -> list[pb.PublishReply]:
    """Publish services: a MicroCore class, a module, or a path to a file or package. `sign_with`:
    a publisher's private key file (`microswarm keys create`); the package is signed here, and the
    coordinator (started with `--publisher-key`) relays the signature to agents."""
    from . import _publisher
    from ._package import build, import_path, services_in
    from .core import MicroCore, check_definition

    if state_dir is None:
        state_dir = default_state_dir()
    if isinstance(target, type) and issubclass(target, MicroCore):
        classes = [target]
    elif isinstance(target, (str, os.PathLike)):
        classes = [c for m in import_path(Path(target)) for c in services_in(m)]
    else:
        classes = services_in(target)
    if not classes:
        raise ValueError(f"no MicroCore subclass with a name found in {target}")
    for cls in classes:  # a name changed after the class was made: one line naming the class and its file
        check_definition(cls)
    signer = _publisher.load_private(sign_with) if sign_with else None
    cred = admin_credential(state_dir)
    target_addr = coordinator or default_coordinator()
    replies = []
    trust = _tls.resolve(target_addr, **_Pin(fingerprint, state_dir, insecure).kwargs())
    with trust.channel(target_addr, CHANNEL_OPTIONS) as channel:
        stub = pbg.CoordinatorStub(channel)
        for cls in classes:
            pkg = build(cls)
            psig = _publisher.sign(pkg.manifest, signer) if signer else b""
            try:
                replies.append(stub.Publish(pb.PublishRequest(manifest=pkg.manifest, archive=pkg.archive,
                                                              publisher_signature=psig),
                                            metadata=[("authorization", f"Admin {cred}")], timeout=60))
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
                    raise from_code("publish_refused", f"{cls.name}: {exc.details()}") from None
                raise _unavailable(exc, target_addr) from None
    return replies
