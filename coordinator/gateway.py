"""The HTTP/JSON gateway: every service at /v1/{group}/{function}, OAuth 2.0, OpenAPI, docs.

Runs on the coordinator's asyncio loop (aiohttp), next to gRPC, when the coordinator is started
with `--http HOST:PORT`. A call goes: bearer token (401/403) -> the dispatcher, which validates
the input from the service's own model before anything is dispatched (400) -> the envelope, the
same as over gRPC, with an HTTP status from its error code (see `openapi.STATUS_OF_CODE`).

Other parts add their pages with `coordinator.gateway.add_route(method, path, handler)` before
the coordinator starts (e.g. /metrics, /dashboard); `gateway.bearer(request, service)` checks a
token for them.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from microcores import _codec
from microcores.core import NAME_RE
from microswarm.protos import microswarm_pb2 as pb

from . import openapi
from .auth import AuthError, ClientRecord, Token
from .auth_grpc import auth_refusal, caller_label, refuse
from .caller import Caller
from .gateway_calls import CallRoutes, wants_async

if TYPE_CHECKING:
    from .server import Coordinator

log = logging.getLogger("microswarm.gateway")

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = _codec.MAX_PAYLOAD + (1 << 20)
MAX_FORM = 16 * 1024       # /oauth/token and /oauth/revoke: a few fields (64 scope patterns at most)
# Slow clients (docs/design.md, Threat model): a connection that has not sent a whole request's
# headers within HEADER_TIMEOUT_S of opening (or of its previous answer) is closed; a body that
# stalls for BODY_IDLE_S is answered 408 and its connection closed; a form must arrive whole within
# FORM_TIMEOUT_S. Bodies are read through bounded readers, chunked or not (read_body).
HEADER_TIMEOUT_S = 15.0
TLS_SHUTDOWN_S = 2.0  # the wait for a departing caller's close_notify
BODY_IDLE_S = 15.0
FORM_TIMEOUT_S = 10.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_HEADERS = {
    **SECURITY_HEADERS,
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
}
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--http {listen!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "0.0.0.0", int(port)


def envelope_json(reply: pb.CallReply, process_time_ms: float) -> bytes:
    """The envelope (microcores.client.Envelope.to_dict, same keys, same order), without re-parsing
    a JSON result: the dispatcher already encoded it with the service's output model."""
    if reply.status == "ok":
        head = b'{"status":"ok","result":' + (reply.result or b"null")
    else:
        err: dict[str, str] = {"code": reply.error.code, "message": reply.error.message}
        if reply.error.field:
            err["field"] = reply.error.field
        if reply.error.details:
            err["details"] = reply.error.details
        head = b'{"status":"error","error":' + json.dumps(err, separators=(",", ":")).encode()
    tail = json.dumps({"executed_by": reply.executed_by, "attempts": reply.attempts,
                       "process_time_ms": round(process_time_ms, 3), "cache_hit": reply.cache_hit,
                       "verified": reply.verified, "service": reply.service, "version": reply.version,
                       **({"upstream_status": reply.upstream_status} if reply.upstream_status else {}),
                       **({"coordinator": reply.coordinator} if reply.coordinator else {}),
                       **({"call_id": reply.call_id} if reply.call_id else {})}, separators=(",", ":")).encode()
    return head + b"," + tail[1:]


class NotScalar(Exception):
    pass


class BodyRefused(Exception):
    """A body too large (413) or too slow (408): refused before it is all read."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: web.Request, limit: int, *, idle_s: float = BODY_IDLE_S,
                    total_s: float | None = None) -> bytes:
    """The request's body, at most `limit` bytes whether it comes with a Content-Length or chunked,
    each piece within `idle_s` and the whole within `total_s`; else BodyRefused, at once."""
    n = request.content_length
    if n is not None and n > limit:
        raise BodyRefused(413, f"the body exceeds {limit} bytes")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_s if total_s else None
    buf = bytearray()
    while True:
        wait = idle_s if deadline is None else min(idle_s, deadline - loop.time())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(request.content.readany(), wait)
        except asyncio.TimeoutError:
            raise BodyRefused(408, "the body came too slowly (send it whole, without pauses over "
                                   f"{idle_s:g} s)") from None
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise BodyRefused(413, f"the body exceeds {limit} bytes")


async def answer_and_close(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Send this answer, then close the connection at once: the rest of a refused body (too large,
    too slow) is neither read nor waited for (aiohttp would otherwise linger to read it)."""
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    if request.protocol is not None:
        request.protocol.force_close()  # the transport flushes the answer before it closes
    return resp


class _Site(web.TCPSite):
    """TCPSite with the TLS handshake bounded like the headers (asyncio's default is 60 s): a client
    that stalls mid-handshake holds its descriptor no longer than a slow-loris one. The TLS shutdown
    is bounded too (default 30 s): a caller that closed without close_notify is gone, and its call must
    be cancelled at once, not when the wait for its close_notify runs out."""

    async def start(self) -> None:
        await web.BaseSite.start(self)
        assert self._runner.server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=HEADER_TIMEOUT_S if self._ssl_context else None,
            ssl_shutdown_timeout=TLS_SHUTDOWN_S if self._ssl_context else None)


class Gateway:
    def __init__(self, coordinator: "Coordinator", listen: str, tls: ssl.SSLContext | None = None) -> None:
        self.c = coordinator
        self.host, self.port = parse_listen(listen)
        self.tls = tls
        self.app = web.Application(client_max_size=MAX_BODY)
        self.runner: web.AppRunner | None = None
        self._openapi: bytes | None = None
        self._scalars: dict[str, dict[str, Any] | None] = {}
        coordinator.registry.listeners.append(self._on_publish)
        coordinator.routes.listeners.append(self._on_routes)
        r = self.app.router
        r.add_route("POST", "/oauth/token", self.token)
        r.add_route("POST", "/oauth/revoke", self.revoke)
        r.add_route("GET", "/openapi.json", self.openapi_json)
        r.add_route("GET", "/docs", self.docs_page)
        r.add_route("GET", "/docs/", self.docs_page)
        r.add_route("GET", "/docs/assets/{name}", self.asset)
        r.add_route("GET", "/", self.root)
        r.add_route("GET", "/healthz", self.healthz)
        self.calls = CallRoutes(self)
        self.calls.register(r)  # /v1/calls/{call_id}: before /v1/{group}/{function}, which would match it
        r.add_route("POST", "/v1/{group}/{function}", self.call)
        r.add_route("GET", "/v1/{group}/{function}", self.call)
        r.add_route("*", "/v1/{group}/{function}", self.wrong_method)
        r.add_route("*", "/v1/{tail:.*}", self.no_such_path)

    # ------------------------------------------------------------ for other parts

    def add_route(self, method: str, path: str, handler: Handler, **kwargs: Any) -> None:
        """Add a page or endpoint (e.g. /metrics, /dashboard) before the coordinator starts."""
        if self.runner is not None:
            raise RuntimeError("add routes before the gateway starts")
        self.app.router.add_route(method, path, handler, **kwargs)

    def bearer(self, request: web.Request, service: str = "*") -> Token:
        """The request's valid access token covering `service`, or web.HTTPUnauthorized/Forbidden."""
        try:
            return self.c.auth.authorize(request.headers.get("Authorization"), service)
        except AuthError as exc:
            raise self._auth_exception(exc) from None

    @staticmethod
    def _auth_exception(exc: AuthError) -> web.HTTPException:
        cls = web.HTTPForbidden if exc.status == 403 else web.HTTPUnauthorized
        return cls(text=json.dumps({"error": exc.error, "error_description": exc.description}),
                   content_type="application/json", headers={"WWW-Authenticate": exc.www_authenticate()})

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://[{host}]:{self.port}" if ":" in host else f"{scheme}://{host}:{self.port}"

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its call, and so the job on its agent
        # keepalive_timeout: aiohttp closes a connection idle in the middle of (or before) a request's
        # headers after this long, counted from the connection's start or its previous answer: the
        # header read timeout (slow-loris). A handler running is never cut by it.
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False, handler_cancellation=True,
                                    keepalive_timeout=HEADER_TIMEOUT_S, max_line_size=8190, max_field_size=8190)
        await self.runner.setup()
        site = _Site(self.runner, self.host, self.port, backlog=1024, reuse_address=True, ssl_context=self.tls)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"cannot serve HTTP on {self.host}:{self.port}: {exc.strerror or exc}") from None
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("HTTP gateway on %s", self.url)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _on_publish(self, entry: Any) -> None:  # runs on the publishing thread
        self._openapi = None
        self._scalars.pop(entry.name, None)

    def _on_routes(self) -> None:  # routes applied or removed (on the loop)
        self._openapi = None
        self._scalars.clear()

    # ------------------------------------------------------------ calls

    @staticmethod
    def _address(request: web.Request) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"http:{peer[0]}:{peer[1]}"
        return "http:" + str(request.remote or "?")

    def _respond(self, reply: pb.CallReply, t0: float, headers: dict[str, str] | None = None) -> web.Response:
        ms = (time.perf_counter() - t0) * 1000
        status = 200 if reply.status == "ok" else openapi.http_status(reply.error.code)
        if reply.error.code == "upstream_error" and 400 <= reply.upstream_status < 500:
            status = reply.upstream_status  # a route's source refused the call: its 4xx, passed through
        h = {"X-Process-Time-Ms": f"{ms:.3f}", **NO_STORE, **SECURITY_HEADERS}
        if headers:
            h.update(headers)
        return web.Response(body=envelope_json(reply, ms), status=status, content_type="application/json",
                            headers=h)

    def _query_input(self, service: str, request: web.Request) -> bytes:
        """GET: the query parameters as the input object (strings, which the model converts)."""
        route = self.c.routes.get(service)
        schema = self.c.route_calls.schema(route) if route is not None else None
        if schema is not None:
            if not schema.scalar:
                raise NotScalar(service)
        else:
            if service not in self._scalars:
                entry = self.c.registry.services.get(service)
                if entry is None:
                    return b"{}"  # the dispatcher answers unknown_service
                self._scalars[service] = openapi.scalar_fields(entry.cls.input_model)
            if self._scalars[service] is None:
                raise NotScalar(service)
        q = request.query
        data: dict[str, str] = {}
        for key in q.keys():
            if key in data:
                continue
            values = q.getall(key)
            if len(values) > 1:
                raise ValueError(f"{key} is given more than once")
            data[key] = values[0]
        if schema is not None:  # a route's JSON Schema types: ?id=7 is 7 where it says integer
            return json.dumps(schema.coerce_query(data)).encode()
        return json.dumps(data).encode()

    async def call(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        group, function = request.match_info["group"], request.match_info["function"]
        service = f"{group}.{function}"
        address = self._address(request)
        client = "anonymous"
        try:
            token = self.c.auth.verify(request.headers.get("Authorization"))
            client = caller_label(token, request.headers.get("X-Client", ""))
            self.c.auth.check(token, service)
        except AuthError as exc:
            reply = auth_refusal(self.c, service, exc, client=client, address=address, t0=t0)
            return self._respond(reply, t0, {"WWW-Authenticate": exc.www_authenticate()})
        if not NAME_RE.match(service):
            reply = refuse(self.c, service, "unknown_service", f"no service named {service!r}: names look like "
                           "group.function, in lower case", client=client, address=address, t0=t0)
            return self._respond(reply, t0)
        if request.method == "GET":
            try:
                raw = self._query_input(service, request)
            except NotScalar:
                reply = refuse(self.c, service, "method_not_allowed", f"{service} takes structured input: "
                               "POST it as a JSON body", client=client, address=address, t0=t0)
                return self._respond(reply, t0, {"Allow": "POST"})
            except ValueError as exc:
                reply = refuse(self.c, service, "invalid_input", str(exc), client=client, address=address, t0=t0)
                return self._respond(reply, t0)
        else:
            try:
                raw = await read_body(request, MAX_BODY)
            except BodyRefused as exc:
                reply = refuse(self.c, service, "too_large" if exc.status == 413 else "invalid_input", exc.message,
                               client=client, address=address, t0=t0)
                resp = self._respond(reply, t0)
                resp.set_status(exc.status)
                return await answer_and_close(request, resp)  # type: ignore[return-value]
        req = pb.CallRequest(service=service, input=b"{}" if not raw or raw.isspace() else raw, encoding=pb.JSON)
        if wants_async(request):
            return self.calls.submit(request, req, Caller(client, token, address), token.client_id)
        try:
            reply = await self.c.dispatcher.call(req, caller=Caller(client, token, address))
        except asyncio.CancelledError:  # handler_cancellation: the caller's connection went away
            log.info("HTTP caller %s went away during %s: its call was cancelled", address, service)
            raise
        return self._respond(reply, t0)

    async def wrong_method(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        service = f"{request.match_info['group']}.{request.match_info['function']}"
        entry = self.c.registry.services.get(service)
        get = entry is not None and openapi.scalar_fields(entry.cls.input_model) is not None
        if (route := self.c.routes.get(service)) is not None:
            get = self.c.route_calls.schema(route).scalar
        reply = pb.CallReply(status="error", executed_by="coordinator", service=service, error=pb.Error(
            code="method_not_allowed", message=f"{request.method} is not how services are called: POST a JSON "
                                               "body" + (", or GET with query parameters" if get else "")))
        return self._respond(reply, t0, {"Allow": "GET, POST" if get else "POST"})

    async def no_such_path(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        reply = pb.CallReply(status="error", executed_by="coordinator", error=pb.Error(
            code="unknown_service", message=f"no service at {request.path}: services are at "
                                            "/v1/{group}/{function} (see /openapi.json)"))
        return self._respond(reply, t0)

    # ------------------------------------------------------------ OAuth 2.0

    @staticmethod
    def _oauth_error(exc: AuthError) -> web.Response:
        headers = dict(NO_STORE)
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="microswarm"'
        if exc.retry_after:
            headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
        return web.json_response({"error": exc.error, "error_description": exc.description},
                                 status=exc.status, headers=headers)

    async def _client(self, request: web.Request, form: Any, limit: bool = False) -> ClientRecord:
        """Client authentication: HTTP Basic (RFC 6749 2.3.1), or client_id/client_secret in the form."""
        auth = request.headers.get("Authorization", "")
        if auth[:6].lower() == "basic ":
            try:
                cid, sep, secret = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise AuthError("invalid_client", "the Basic credentials are not base64 of id:secret", 401) from None
            if not sep:
                raise AuthError("invalid_client", "the Basic credentials are not id:secret", 401)
            from urllib.parse import unquote_plus  # RFC 6749 2.3.1: form-encoded before base64
            cid, secret = unquote_plus(cid), unquote_plus(secret)
        else:
            cid, secret = form.get("client_id", ""), form.get("client_secret", "")
            if not cid:
                raise AuthError("invalid_client", "authenticate with HTTP Basic: your client id and secret", 401)
        if limit:  # token requests per client id, counted before the secret is checked (no guessing spree)
            self.c.auth.limit_token_requests("", str(cid))
        return self.c.auth.authenticate(cid, secret)

    async def _form(self, request: web.Request) -> Any:
        """The form, at most MAX_FORM bytes (also chunked: the limit holds while reading), whole
        within FORM_TIMEOUT_S."""
        if request.content_length is not None and request.content_length > MAX_FORM:
            raise AuthError("invalid_request", f"the form is larger than {MAX_FORM} bytes", 413)
        ctype = request.content_type
        if ctype not in ("application/x-www-form-urlencoded", "multipart/form-data", "application/octet-stream"):
            raise AuthError("invalid_request", "send the parameters as application/x-www-form-urlencoded", 400)
        try:
            return await asyncio.wait_for(request.clone(client_max_size=MAX_FORM).post(), FORM_TIMEOUT_S)
        except web.HTTPRequestEntityTooLarge:
            raise AuthError("invalid_request", f"the form is larger than {MAX_FORM} bytes", 413) from None
        except asyncio.TimeoutError:
            raise AuthError("invalid_request", f"the form did not arrive within {FORM_TIMEOUT_S:g} s", 408) from None
        except (ValueError, UnicodeDecodeError, web.HTTPException):
            raise AuthError("invalid_request", "the form could not be read", 400) from None

    def _peer_host(self, request: web.Request) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else str(request.remote or "?")

    async def token(self, request: web.Request) -> web.Response:
        a = self.c.auth
        try:
            a.limit_token_requests(self._peer_host(request))
            form = await self._form(request)
            grant = str(form.get("grant_type", ""))
            if grant not in ("client_credentials", "refresh_token"):
                raise AuthError("unsupported_grant_type" if grant else "invalid_request",
                                "grant_type must be client_credentials or refresh_token", 400)
            client = await self._client(request, form, limit=True)
            scope = str(form["scope"]) if form.get("scope") else None
            if grant == "client_credentials":
                answer = a.client_credentials(client, scope)
            else:
                rt = str(form.get("refresh_token", ""))
                if not rt:
                    raise AuthError("invalid_request", "refresh_token is missing", 400)
                answer = a.refresh(client, rt, scope)
        except AuthError as exc:
            if exc.status in (408, 413):  # a form too large or too slow: its rest is not read
                return await answer_and_close(request, self._oauth_error(exc))  # type: ignore[return-value]
            return self._oauth_error(exc)
        return web.json_response(answer, headers=NO_STORE)

    async def revoke(self, request: web.Request) -> web.Response:
        try:
            form = await self._form(request)
            client = await self._client(request, form)
            token = str(form.get("token", ""))
            if not token:
                raise AuthError("invalid_request", "token is missing", 400)
        except AuthError as exc:
            if exc.status in (408, 413):
                return await answer_and_close(request, self._oauth_error(exc))  # type: ignore[return-value]
            return self._oauth_error(exc)
        self.c.auth.revoke(client, token, str(form.get("token_type_hint", "")))
        return web.Response(status=200, headers=NO_STORE)

    # ------------------------------------------------------------ documents and pages

    def openapi_doc(self) -> bytes:
        doc = self._openapi
        if doc is None:
            from microcores import __version__
            from .route_admin import document
            doc = json.dumps(document(openapi.build(self.c.registry.current(), version=__version__),
                                      self.c.routes.current())).encode()
            self._openapi = doc
        return doc

    async def openapi_json(self, request: web.Request) -> web.Response:
        return web.Response(body=self.openapi_doc(), content_type="application/json",
                            headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})

    async def docs_page(self, request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / "docs.html").read_bytes(), content_type="text/html",
                            charset="utf-8", headers={"Cache-Control": "no-cache", **PAGE_HEADERS})

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        path = STATIC / name
        if "/" in name or name.startswith(".") or path.suffix not in types or not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes(), content_type=types[path.suffix],
                            headers={"Cache-Control": "no-cache", **PAGE_HEADERS})

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/docs")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "services": len(self.c.registry.services),
                                  "agents": len(self.c.agents)}, headers=NO_STORE)
