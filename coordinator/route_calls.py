"""A route's call, inside the dispatcher's pipeline: a route is a service like any other.

`RoutingDispatcher` is the coordinator's Dispatcher with one change: a call whose service is a route
(routes.py) is answered here instead of by the scheduler, within the same `Dispatcher.call`: so the
caller's scope (and a nested call's, from `self.call()` inside a MicroCore), the call log, the metrics
observers, cancellation and the drain treat it exactly as a MicroCore's call. Here: the input is
decoded and checked against the route's JSON Schema (Table 3 words, route_input.py) before anything is
forwarded; a pure route's answer comes from the result cache when it is there; otherwise the source is
asked (upstream.py) on the coordinator's loop, never on a volunteer, and its answer is the result,
`executed_by` "upstream", with the source's HTTP status in `upstream_status`.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from microcores import _codec
from microcores.errors import DeadlineExceeded, DepthExceeded, InvalidInput
from microswarm.protos import microswarm_pb2 as pb

from .cache import cache_key
from .dispatch import MAX_DEPTH, Dispatcher
from .route_input import InputSchema, canonical
from .routes import Route, RouteTable
from .upstream import Upstream, UpstreamError, UpstreamUnavailable
from .verify import opened, seal

UPSTREAM = "upstream"  # executed_by of a route's answer from its source


class RouteCalls:
    def __init__(self, table: RouteTable, upstream: Upstream, cache: Callable[[], Any]) -> None:
        self.table = table
        self.upstream = upstream
        self.cache = cache  # the coordinator's result cache, or None (read per call: it starts later)
        self._schemas: dict[str, tuple[Route, InputSchema]] = {}

    def schema(self, route: Route) -> InputSchema:
        """The route's compiled schema (compiled once per definition: a route applied anew is a new object)."""
        held = self._schemas.get(route.name)
        if held is None or held[0] is not route:
            held = (route, InputSchema(route.schema))
            self._schemas[route.name] = held
        return held[1]

    def decode(self, req: pb.CallRequest) -> Any:
        if req.encoding == pb.JSON:
            raw = req.input
            if len(raw) > _codec.MAX_PAYLOAD:
                raise InvalidInput(f"input of {len(raw)} bytes exceeds the limit of {_codec.MAX_PAYLOAD}")
            if not raw or raw.isspace():
                return {}
            try:
                return json.loads(raw)
            except ValueError as exc:
                raise InvalidInput(f"input is not valid JSON: {exc}") from None
        return _codec.unpack(req.input) if req.input else {}

    async def run(self, route: Route, req: pb.CallRequest, reply: pb.CallReply) -> None:
        reply.version = route.version
        chain = list(req.chain)
        if len(chain) >= MAX_DEPTH:
            raise DepthExceeded(f"call depth {len(chain) + 1} exceeds the limit of {MAX_DEPTH}: "
                                f"{' -> '.join(chain + [route.name])}")
        value = self.decode(req)
        self.schema(route).validate(value)  # before anything is forwarded

        cache = self.cache() if route.pure else None
        key = None
        if cache is not None:
            key = cache_key(route.digest, route.name, canonical(value))
            hit = cache.get(key)
            if hit is not None:
                data, _, verified = opened(hit)
                reply.executed_by, reply.cache_hit, reply.attempts, reply.verified = "cache", True, 0, verified
                reply.upstream_status = int.from_bytes(data[:2], "big")
                reply.result = _encoded(route, data[2:], req.encoding)
                return

        budget = min(route.timeout, req.deadline_s) if req.deadline_s > 0 else route.timeout
        reply.executed_by = UPSTREAM
        try:
            answer = await self.upstream.forward(route, value, budget)
        except UpstreamError as exc:
            reply.attempts, reply.upstream_status = 1, exc.upstream_status
            raise
        except UpstreamUnavailable:
            reply.attempts = 1
            raise
        reply.attempts, reply.upstream_status = answer.attempts, answer.status
        reply.verified = True  # no volunteer took part: the coordinator asked the operator's source itself
        reply.result = _encoded(route, answer.result, req.encoding)
        if key is not None and cache is not None:
            cache.put(key, seal(answer.status.to_bytes(2, "big") + answer.result, (UPSTREAM,), True), route.cache_ttl)


def _encoded(route: Route, result: bytes, encoding: int) -> bytes:
    """The source's JSON as the caller asked for it: as it is, or msgpack (a nested call's)."""
    if encoding == pb.JSON:
        return result
    try:
        return _codec.pack(json.loads(result))
    except (ValueError, TypeError, OverflowError) as exc:
        raise UpstreamError(f"{route.name}: the source's answer cannot be carried as msgpack ({exc}); call it "
                            "with JSON") from None


class RoutingDispatcher(Dispatcher):
    """The Dispatcher, answering routes (see the module's docstring); everything else as before."""

    routes: RouteCalls | None = None

    async def _call(self, req: pb.CallRequest, reply: pb.CallReply, *more: Any) -> None:
        """`more`: what the Dispatcher's own _call takes beside (an input still arriving), passed on."""
        route = self.routes.table.get(req.service) if self.routes is not None else None
        if route is None:
            await super()._call(req, reply, *more)
            return
        inflow = more[0] if more else None
        if inflow is not None:  # an input that streams in: a route sends it whole, so it waits for all of it
            try:
                async with asyncio.timeout(route.timeout):
                    req.input = await inflow.read()
            except TimeoutError:
                raise DeadlineExceeded(f"the input of {route.name} did not arrive within {route.timeout:g} s") from None
        await self.routes.run(route, req, reply)  # type: ignore[union-attr]
