"""Forwarding a route's call to its source: one pooled aiohttp client on the coordinator's loop.

One `aiohttp.ClientSession` for every route (aiohttp is already the gateway's server; its client
keeps connections alive and reuses them per host, which is most of the difference between 0.2 s
and 1 ms a call): at most POOL_LIMIT connections in all and POOL_PER_HOST to one source, idle ones
kept KEEPALIVE_S. Each request is bounded in time (the route's timeout, or the caller's deadline
when sooner) and in size (the route's max_response); nothing of the caller's request but the
validated input reaches the source: not its token, not its headers.

What the source answers becomes the envelope (`Answer`): a 2xx with a JSON body is the result as it
is (text is a JSON string; an empty body null). Anything else is an error that names the source's
status (`upstream_status`): 3xx (redirects are not followed: a route names its final URL, and the
route's secret headers must not follow a redirect elsewhere), 4xx and 5xx are `upstream_error`; a
source that cannot be reached, or that drops the connection, is `upstream_unavailable`; one too
slow is `deadline_exceeded`. Cookies are never kept (a session cookie set for one caller must not
ride on another's call).
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from microcores.errors import DeadlineExceeded, MicroError

from .routes import PLACEHOLDER, Route

log = logging.getLogger("microswarm.upstream")

POOL_LIMIT = 256        # connections to all sources together
POOL_PER_HOST = 64      # ...to one source
KEEPALIVE_S = 30.0      # an idle connection is kept this long for the next call
DETAILS_MAX = 2048      # of a source's error body, kept in the error's details
USER_AGENT = "microswarm-route"


class UpstreamUnavailable(MicroError):
    code = "upstream_unavailable"


class UpstreamError(MicroError):
    code = "upstream_error"

    def __init__(self, message: str, *, status: int = 0, details: str = "") -> None:
        super().__init__(message, details=details)
        self.upstream_status = status  # the source's HTTP status, when it answered


@dataclass
class Answer:
    status: int
    result: bytes      # JSON
    attempts: int = 1


class Upstream:
    def __init__(self, limit: int = POOL_LIMIT, per_host: int = POOL_PER_HOST) -> None:
        self.limit, self.per_host = limit, per_host
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """Made on first use, on the running loop (the coordinator's)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.limit, limit_per_host=self.per_host,
                                             keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                                  headers={"User-Agent": USER_AGENT}, trust_env=False,
                                                  auto_decompress=True, raise_for_status=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def forward(self, route: Route, value: dict[str, Any], budget_s: float) -> Answer:
        """Send the validated input as the route says, within `budget_s`; the source's answer."""
        url, body = request_parts(route, value)
        headers = {"Accept": "application/json", **route.headers}
        if body is not None:
            headers["Content-Type"] = "application/json"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        attempts = 0
        while True:
            attempts += 1
            left = deadline - loop.time()
            if left <= 0:
                raise DeadlineExceeded(f"{route.name}: the source did not answer within {budget_s:g} s")
            try:
                status, data, ctype = await self._once(route, url, headers, body, left)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # a kept-alive connection the source had closed meanwhile: an idempotent call is sent again
                # once, on a new connection; the source may have got the first one only if it dropped it
                if attempts == 1 and route.idempotent and not isinstance(exc, aiohttp.ClientConnectorError):
                    continue
                raise _unavailable(route, exc) from None
            return Answer(status, _result(route, status, data, ctype), attempts)

    async def _once(self, route: Route, url: URL, headers: dict[str, str], body: bytes | None,
                    budget_s: float) -> tuple[int, bytes, str]:
        try:
            async with self.session.request(route.method, url, headers=headers, data=body, allow_redirects=False,
                                            timeout=aiohttp.ClientTimeout(total=budget_s)) as resp:
                if resp.content_length is not None:  # the size is known: one read, or a refusal unread
                    if resp.content_length > route.max_response:
                        raise _too_large(route, resp.status)
                    return resp.status, await resp.read(), resp.headers.get("Content-Type", "")
                data = bytearray()  # chunked: read while it stays within the bound
                while True:
                    chunk = await resp.content.read(1 << 16)
                    if not chunk:
                        break
                    data += chunk
                    if len(data) > route.max_response:
                        raise _too_large(route, resp.status)
                return resp.status, bytes(data), resp.headers.get("Content-Type", "")
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"{route.name}: the source did not answer within {budget_s:.3g} s "
                                   f"(the route's timeout is {route.timeout:g} s)") from None
        except aiohttp.ClientConnectorError as exc:
            raise _unavailable(route, exc) from None
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamError(f"{route.name}: the source's answer broke off: {exc}") from None
        except aiohttp.ClientResponseError as exc:
            raise UpstreamError(f"{route.name}: the source's answer is not valid HTTP: {exc.message}") from None


def _unavailable(route: Route, exc: BaseException) -> UpstreamUnavailable:
    host = URL(PLACEHOLDER.sub("x", route.url)).host
    why = getattr(exc, "strerror", None) or type(exc).__name__
    return UpstreamUnavailable(f"{route.name}: the source at {host} cannot be reached ({why}); retry later")


def _too_large(route: Route, status: int) -> UpstreamError:
    return UpstreamError(f"{route.name}: the source answered more than {route.max_response} bytes (the route's "
                         "max_response)", status=status)


def request_parts(route: Route, value: dict[str, Any]) -> tuple[URL, bytes | None]:
    """The URL (path parameters filled in, each one path segment; the query) and the JSON body."""
    rest = dict(value)

    def fill(m: Any) -> str:
        v = rest.pop(m.group(1))
        text = _text(v)
        if text in (".", ".."):  # never a dot segment: the caller must not walk the source's paths
            return text.replace(".", "%2E")
        return quote(text, safe="")

    url = PLACEHOLDER.sub(fill, route.url)
    body: bytes | None = None
    if route.input == "query" and rest:
        pairs: list[tuple[str, str]] = []
        for k, v in rest.items():
            if v is None:
                continue
            for item in (v if isinstance(v, list) else [v]):
                pairs.append((k, _text(item)))
        if pairs:
            url += ("&" if "?" in url else "?") + urlencode(pairs)
    elif route.input == "json":
        body = json.dumps(rest, separators=(",", ":"), ensure_ascii=False).encode()
    return URL(url, encoded=True), body


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    return "" if v is None else str(v)


def _result(route: Route, status: int, data: bytes, ctype: str) -> bytes:
    """A 2xx's body as the result (JSON bytes); any other status an error naming it."""
    kind = ctype.split(";", 1)[0].strip().lower()
    if not 200 <= status < 300:
        if 300 <= status < 400:
            why = f"a redirect ({status}), which a route does not follow: give the route its final URL"
        else:
            why = f"HTTP {status}"
        raise UpstreamError(f"{route.name}: the source answered {why}", status=status, details=_details(data, kind))
    if not data.strip():
        return b"null"
    if kind == "application/json" or kind.endswith("+json") or not kind:
        try:
            json.loads(data)
        except ValueError:
            if kind:
                raise UpstreamError(f"{route.name}: the source said {kind} but its answer is not JSON",
                                    status=status) from None
        else:
            return data
    if kind.startswith("text/") or not kind:
        try:
            return json.dumps(data.decode("utf-8"), ensure_ascii=False).encode()
        except UnicodeDecodeError:
            pass
    raise UpstreamError(f"{route.name}: the source answered {kind or 'bytes'}, neither JSON nor text", status=status)


def _details(data: bytes, kind: str) -> str:
    """The start of a source's error body (its own words about what went wrong), as text."""
    if not data or not (kind.startswith("text/") or "json" in kind or not kind):
        return ""
    text = data[:DETAILS_MAX].decode("utf-8", errors="replace")
    return text + ("..." if len(data) > DETAILS_MAX else "")
