"""`/dashboard`: a live web view for the operator (the paper's call-log page, figure 3, and more).

Agents with load and last heartbeat, services and versions, the call log with the paper's columns
(client, date, IP and port, function, success), and the cache and governor figures, under charts of
the last 5 minutes (calls/s by who ran them, latency percentiles, errors/s by code, agents and their
load, the cache's hit ratio, the heap against the governor's thresholds; timeline.py keeps them). The
page polls `/dashboard/data` once a second and draws the charts as SVG itself. Assets ship inside the
package: it works with no internet.

Only the operator may look: HTTP Basic with the admin credential of the state directory as the
password (any user name; the browser asks once), or a bearer token of the built-in `operator`
client (what the CLI mints from the same credential).
"""
from __future__ import annotations

import base64
import hmac
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from aiohttp import web

from microcores.errors import MicroError

from .timeline import Timeline

if TYPE_CHECKING:
    from .server import Coordinator

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"dashboard.js": "application/javascript", "dashboard.css": "text/css"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
REALM = 'Basic realm="microswarm operator", charset="UTF-8"'
MAX_RUNNING = 100  # calls in flight listed (the longest-running first), with their progress


def peer(address: str) -> dict[str, str]:
    """The paper's "IP and port" and the way the call came: gRPC peers read `ipv4:1.2.3.4:5`,
    `ipv6:%5B::1%5D:5` or `unix:...`, the HTTP gateway's `http:1.2.3.4:5`."""
    scheme, sep, rest = address.partition(":")
    if not sep or scheme not in ("ipv4", "ipv6", "http", "unix"):
        return {"address": address, "via": ""}
    return {"address": unquote(rest), "via": "http" if scheme == "http" else "grpc"}


class Dashboard:
    def __init__(self, coordinator: "Coordinator") -> None:
        self.c = coordinator
        self.timeline = Timeline()  # the charts: the last 5 minutes, fed by every call and a 1 s sampler
        coordinator.dispatcher.observers.append(self.timeline.observe)

    def gauges(self) -> dict[str, Any]:
        """What the timeline samples once a second (see timeline.Timeline.sample)."""
        c = self.c
        agents = list(c.agents.values())
        g: dict[str, Any] = {"agents": len(agents), "agent_ids": [a.agent_id for a in agents],
                             "busy_slots": sum(a.running for a in agents), "total_slots": sum(a.slots for a in agents),
                             "in_flight": c.dispatcher.in_flight}
        if c.cache is not None:
            st = c.cache.stats()
            g["hits"], g["misses"] = st["hits"], st["misses"]
        if c.governor is not None:
            s = c.governor.settings
            g["heap_bytes"] = c.governor.heap_bytes
            g["heap_limits"] = {"max": s.max_heap_bytes, "soft_target": s.soft_bytes, "eviction": s.eviction_bytes,
                                "critical": s.critical_bytes}
        return g

    def routes(self, add: Any) -> None:
        add("GET", "/dashboard", self.page)
        add("GET", "/dashboard/", self.page)
        add("GET", "/dashboard/data", self.data)
        add("GET", "/dashboard/assets/{name}", self.asset)

    # ------------------------------------------------------------ who may look

    def _operator(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        admin = self.c.admin_credential()
        if header.startswith("Basic ") and admin:
            try:
                _, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                password = ""
            if hmac.compare_digest(password.encode(), admin.encode()):
                return
        elif header.startswith("Bearer ") and self.c.auth is not None:
            try:
                token = self.c.auth.authorize(header, "*")
            except MicroError:
                token = None
            except Exception:  # the auth layer's own refusal type
                token = None
            if token is not None and token.client_id == "operator":
                return
        raise web.HTTPUnauthorized(
            text="the dashboard is the operator's: sign in with the admin credential from the coordinator's "
                 "state directory (admin.token) as the password", headers={"WWW-Authenticate": REALM})

    # ------------------------------------------------------------ handlers

    async def page(self, request: web.Request) -> web.Response:
        self._operator(request)
        return web.Response(body=(STATIC / "dashboard.html").read_bytes(), content_type="text/html",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound(text=f"no dashboard asset named {name[:40]!r}")
        return web.Response(body=(STATIC / name).read_bytes(), content_type=ASSETS[name],
                            headers={"Cache-Control": "max-age=300"})

    async def data(self, request: web.Request) -> web.Response:
        self._operator(request)
        calls = request.query.get("calls", "50")
        if not calls.isdigit() or len(calls) > 4:
            raise web.HTTPBadRequest(text="calls: give a whole number of log rows, 1 to 500")
        return web.Response(body=json.dumps(self.snapshot(int(calls))),
                            content_type="application/json", headers={"Cache-Control": "no-store"})

    def snapshot(self, calls: int = 50) -> dict[str, Any]:
        c = self.c
        now = time.monotonic()
        agents = []
        for a in sorted(c.agents.values(), key=lambda a: a.agent_id):
            info = a.info()
            t = c.verifier.of(a.agent_id)
            agents.append({"id": a.agent_id, "address": peer(a.address)["address"], "state": info.state, "slots": a.slots,
                           "trust": c.verifier.trust(a.agent_id, a.quarantined), "agreements": t.agreements,
                           "disagreements": t.disagreements,
                           "running": a.running, "last_heartbeat_s": round(now - a.last_seen, 2),
                           "packages": list(info.packages), "done": a.jobs_done, "failed": a.jobs_failed,
                           "cpu_percent": round(info.cpu_percent, 1), "rss_bytes": info.rss_bytes})
        services = []
        for e in c.registry.current():
            services.append({"name": e.name, "version": e.version, "revision": e.revision, "pure": e.cls.pure,
                             "builtin": e.builtin, "digest": e.digest[:12],
                             "agents": sum(1 for a in c.agents.values() if e.digest in a.holdings)})
        log = [{"time": x.time, "client": x.client, **peer(x.address), "service": x.service,
                "executed_by": x.executed_by, "success": x.success, "ms": round(x.ms, 2),
                "error": x.error_code} for x in reversed(c.calllog.recent(max(1, min(calls, 500))))]
        flight = sorted(c.dispatcher.progress.items(), key=lambda kv: kv[1].started)[:MAX_RUNNING]
        running = [{"call": cid[:10], "service": p.service, "progress": round(p.fraction, 4), "message": p.message,
                    "executed_by": p.executor, "age_s": round(now - p.started, 1)} for cid, p in flight]
        return {"coordinator": c.state.fingerprint.hex()[:16], "uptime_s": round(time.time() - c.started, 1),
                "calls_total": c.calllog.total, "fallbacks_total": c.dispatcher.fallbacks,
                "in_flight": c.dispatcher.in_flight, "placement": c.placement.name,
                "dispatch": c.dispatcher.strategy.name, "queue_depth": len(c.scheduler.queue), "agents": agents, "services": services, "calls": log,
                "running": running,
                "cache": c.cache_stats(), "timeline": self.timeline.series()}
