"""`microswarm bench`: what a route adds over calling its source directly (seed 001's process-time
trial, where its gateway added 199 ms on average).

A small aiohttp source starts in the bench's process; a route to it (`bench.route`, GET, input in the
query, not pure: every call reaches the source) is applied to the bench's coordinator; then the same
request goes through the gateway (`GET /v1/bench/route?id=N`, HTTPS, bearer token) and straight to the
source (`GET /data?id=N`), interleaved, `n` of each after a warm-up, both on keep-alive connections.
route_overhead_p50_ms = p50(through the route) - p50(direct); likewise p99.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

ROUTE = "bench.route"
KEYS = ("route_overhead_p50_ms", "route_overhead_p99_ms", "route_p50_ms", "route_direct_p50_ms")


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def _apply(addr: str, state_dir: str, source_url: str) -> None:
    """The route, applied with the operator's credential (as `microswarm routes apply` does)."""
    from microcores import _tls
    from microcores.client import CHANNEL_OPTIONS, admin_credential
    from microswarm.coordinator.routes import check
    from microswarm.protos import microswarm_pb2 as pb
    from microswarm.protos import microswarm_pb2_grpc as pbg

    route = check({"name": ROUTE, "url": source_url, "method": "GET", "input": "query", "timeout": 5,
                   "headers": {"X-Api-Key": "bench"},
                   "schema": {"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}}})
    with _tls.resolve(addr, state_dir=state_dir).channel(addr, CHANNEL_OPTIONS) as channel:
        pbg.RoutesStub(channel).Apply(pb.ApplyRoutesRequest(routes=[route.to_spec()]), timeout=15,
                                      metadata=[("authorization", f"Admin {admin_credential(state_dir)}")])


async def _measure(addr: str, state_dir: str, http_url: str, n: int, ssl: Any) -> dict[str, float]:
    import aiohttp
    from aiohttp import web

    from microcores.client import AsyncClient
    from microswarm.cluster import free_port

    async def data(request: web.Request) -> web.Response:
        return web.json_response({"id": int(request.query["id"]), "name": "Ni Luh Ayu", "unit": "Finance"})

    app = web.Application()
    app.router.add_get("/data", data)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    direct_url = f"http://127.0.0.1:{port}/data"
    try:
        await asyncio.get_running_loop().run_in_executor(None, _apply, addr, state_dir, direct_url)
        async with AsyncClient(addr, client_name="bench", state_dir=state_dir, multiplex=False) as c:
            headers = {"Authorization": f"Bearer {await c.token()}"}
        routed_url = http_url + "/v1/" + ROUTE.replace(".", "/")
        routed: list[float] = []
        direct: list[float] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl)) as gw, \
                aiohttp.ClientSession() as plain:
            async def via_route(i: int) -> None:
                async with gw.get(routed_url, params={"id": str(i)}, headers=headers) as r:
                    body = await r.read()
                    if r.status != 200 or json.loads(body)["executed_by"] != "upstream":
                        raise RuntimeError(f"a call through the route failed: {r.status} {body[:200]!r}")

            async def straight(i: int) -> None:
                async with plain.get(direct_url, params={"id": str(i)}) as r:
                    body = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"the source failed: {r.status} {body[:200]!r}")

            for i in range(50):  # connections open, both paths warm
                await via_route(i)
                await straight(i)
            for i in range(n):
                for fn, out in ((via_route, routed), (straight, direct)):
                    t0 = time.perf_counter()
                    await fn(1000 + i)
                    out.append((time.perf_counter() - t0) * 1000)
    finally:
        await runner.cleanup()
    return {"route_overhead_p50_ms": round(statistics.median(routed) - statistics.median(direct), 3),
            "route_overhead_p99_ms": round(_pct(routed, 99) - _pct(direct, 99), 3),
            "route_p50_ms": round(statistics.median(routed), 3),
            "route_direct_p50_ms": round(statistics.median(direct), 3)}


def route_overhead(addr: str, state_dir: str | None, http_url: str | None, n: int = 200) -> dict[str, Any]:
    """The route overhead figures (KEYS); None each when there is no gateway or no operator credential
    (a coordinator of someone else's: a route needs the operator to apply it)."""
    if not http_url or not state_dir:
        return dict.fromkeys(KEYS)
    from microcores import _tls
    trust = _tls.from_state_dir(state_dir)
    ctx = trust.ssl_context() if trust is not None else None
    return asyncio.run(_measure(addr, state_dir, http_url, n, ctx if ctx is not None else True))


def main() -> None:
    """`python -m microswarm.bench_routes`: the figures alone, on a cluster of their own (no agent needed)."""
    from microswarm.cluster import LocalCluster

    with LocalCluster(agents=0, http=True) as c:
        print(json.dumps(route_overhead(c.addr, str(c.state), c.http_url)), flush=True)


if __name__ == "__main__":
    main()
