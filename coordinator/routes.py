"""Routes: existing web services behind the gateway (seed 001's endpoint conversion, its Figure 5).

An operator declares routes in a TOML file (`microswarm routes apply FILE`); each route is a service
`group.function` that the coordinator answers by forwarding the validated input to a source URL
(upstream.py), never on a volunteer: the source may be inside the operator's network.

    [[route]]
    name = "pegawai.data"                        # the service name, group.function
    url = "http://127.0.0.1:9000/pegawai/data"   # the source; {field} in its path takes a path parameter
    method = "GET"                               # GET, POST, PUT, PATCH or DELETE
    input = "query"                              # query | json | path: how the input reaches the source
    timeout = 5                                  # seconds
    pure = false                                 # true: answers may be cached
    headers = { "X-Api-Key" = "..." }            # optional, sent to the source; secrets
    [route.schema]                               # JSON Schema of the input, validated before forwarding
    type = "object"

Keys beyond the issue's contract: `description` (for the docs), `cache_ttl` (seconds a pure route's
answer is kept; none: until evicted) and `max_response` (bytes, default 16 MiB).

This module is the model: parsing and checking a definition (`parse_file`, `check`), and the table
of routes in force (`RouteTable`), kept in the state directory's `routes.json` (0600: it holds the
header values) so that routes survive a restart. Header values never leave it again: listings,
status, the OpenAPI document and errors carry header names only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import tomllib
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError

from microcores.core import NAME_RE
from microcores.errors import MicroError
from microswarm.protos import microswarm_pb2 as pb

log = logging.getLogger("microswarm.routes")

ROUTES_FILE = "routes.json"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
INPUTS = ("query", "json", "path")
KEYS = ("name", "url", "method", "input", "timeout", "pure", "headers", "schema", "description", "cache_ttl",
        "max_response")
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 3600.0
DEFAULT_MAX_RESPONSE = 16 << 20
MAX_RESPONSE = 64 << 20            # the envelope's own payload limit (microcores._codec.MAX_PAYLOAD)
MAX_ROUTES = 10_000
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
# set by the HTTP client itself, or meaningful only hop by hop: a route may not set them
RESERVED_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
                    "trailer", "proxy-connection", "content-type"}


class RouteError(MicroError):
    """A route definition that cannot be applied; the message names the route and the key."""

    code = "invalid_route"


@dataclass(frozen=True)
class Route:
    name: str
    url: str
    method: str = "GET"
    input: str = "query"
    timeout: float = DEFAULT_TIMEOUT_S
    pure: bool = False
    headers: dict[str, str] = field(default_factory=dict)   # secrets
    schema: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    cache_ttl: float | None = None
    max_response: int = DEFAULT_MAX_RESPONSE
    revision: int = 1
    applied_at: float = 0.0

    @property
    def path_fields(self) -> list[str]:
        """The input fields the url's path takes ({field}), in order."""
        return PLACEHOLDER.findall(self.url)

    @property
    def idempotent(self) -> bool:
        return self.method in ("GET", "PUT", "DELETE")

    @property
    def version(self) -> str:
        return str(self.revision)

    @cached_property
    def digest(self) -> str:
        """Of the definition, header names but not their values: the cache key's part (a new definition
        caches anew) and what listings show. A digest of a secret would let a short one be guessed."""
        d = self.definition(secrets=False)
        d["headers"] = sorted(k.lower() for k in self.headers)
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def definition(self, secrets: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "url": self.url, "method": self.method, "input": self.input,
                             "timeout": self.timeout, "pure": self.pure, "schema": self.schema,
                             "description": self.description, "cache_ttl": self.cache_ttl,
                             "max_response": self.max_response}
        if secrets:
            d["headers"] = dict(self.headers)
        return d

    def same(self, other: "Route") -> bool:
        return self.definition() == other.definition()

    def to_spec(self) -> pb.RouteSpec:
        return pb.RouteSpec(name=self.name, url=self.url, method=self.method, input=self.input,
                            timeout_s=self.timeout, pure=self.pure, headers=self.headers,
                            schema_json=json.dumps(self.schema), description=self.description,
                            cache_ttl_s=self.cache_ttl or 0.0, max_response_bytes=self.max_response)

    def info(self) -> pb.RouteInfo:
        """What may be shown: everything but the header values."""
        return pb.RouteInfo(name=self.name, url=self.url, method=self.method, input=self.input,
                            timeout_s=self.timeout, pure=self.pure, header_names=sorted(self.headers),
                            schema_json=json.dumps(self.schema), description=self.description,
                            cache_ttl_s=self.cache_ttl or 0.0, max_response_bytes=self.max_response,
                            revision=self.revision, digest=self.digest, applied_at=self.applied_at)

    def service_info(self) -> pb.ServiceInfo:
        return pb.ServiceInfo(name=self.name, version=self.version, digest=self.digest, pure=self.pure,
                              idempotent=self.idempotent, timeout_s=self.timeout, builtin=False, agents=0,
                              revision=self.revision, description=self.description or f"route: {self.method} "
                              "to an existing web service")


def _where(raw: dict[str, Any], index: int) -> str:
    name = raw.get("name")
    return f"route {name!r}" if isinstance(name, str) and name else f"route #{index + 1}"


def check(raw: dict[str, Any], index: int = 0) -> Route:
    """One route's definition (a TOML table, or a RouteSpec made into one) checked whole; RouteError
    naming the route and the key at fault."""
    where = _where(raw, index)

    def bad(key: str, why: str) -> RouteError:
        return RouteError(f"{where}: {key}: {why}", field=key)

    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise bad(unknown[0], f"unknown key (a route takes {', '.join(KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise bad("name", f"{name!r} must look like group.function, in lower case (e.g. pegawai.data)")
    url = raw.get("url")
    if not isinstance(url, str) or not url:
        raise bad("url", "missing: the source's URL, e.g. http://127.0.0.1:9000/pegawai/data")
    method = raw.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise bad("method", f"{method!r} is not one of {', '.join(METHODS)}")
    method = method.upper()
    kind = raw.get("input", "query")
    if kind not in INPUTS:
        raise bad("input", f"{kind!r} is not one of {', '.join(INPUTS)} (how the input reaches the source)")
    if kind == "json" and method == "GET":
        raise bad("input", "a GET has no body: use input = \"query\" or \"path\", or another method")
    timeout = _number(raw.get("timeout", DEFAULT_TIMEOUT_S), bad, "timeout", 0, MAX_TIMEOUT_S)
    pure = raw.get("pure", False)
    if not isinstance(pure, bool):
        raise bad("pure", f"{pure!r} must be true or false")
    cache_ttl = raw.get("cache_ttl")
    if cache_ttl is not None:
        cache_ttl = _number(cache_ttl, bad, "cache_ttl", 0, 365 * 86400)
    max_response = raw.get("max_response", DEFAULT_MAX_RESPONSE)
    if isinstance(max_response, bool) or not isinstance(max_response, int) or not 0 < max_response <= MAX_RESPONSE:
        raise bad("max_response", f"{max_response!r} must be a number of bytes from 1 to {MAX_RESPONSE}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise bad("description", "must be a string")
    headers = _headers(raw.get("headers", {}), bad)
    schema = raw.get("schema")
    if not isinstance(schema, dict):
        raise bad("schema", "missing: [route.schema], the input's JSON Schema (type = \"object\")")
    schema = _schema(schema, bad)
    _url(url, kind, schema, bad)
    return Route(name, url, method, kind, timeout, pure, headers, schema, description, cache_ttl, max_response)


def _number(value: Any, bad: Callable[[str, str], RouteError], key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
        raise bad(key, f"{value!r} must be a number of seconds, more than {low:g} and at most {high:g}")
    return float(value)


def _headers(headers: Any, bad: Callable[[str, str], RouteError]) -> dict[str, str]:
    if not isinstance(headers, dict):
        raise bad("headers", "must be a table of header names and values, e.g. { \"X-Api-Key\" = \"...\" }")
    out: dict[str, str] = {}
    for k, v in headers.items():
        if not isinstance(k, str) or not HEADER_NAME.match(k):
            raise bad("headers", f"{k!r} is not a header name")
        if k.lower() in RESERVED_HEADERS:
            raise bad("headers", f"{k} is set by the gateway itself, not by a route")
        if not isinstance(v, str) or any(c in v for c in "\r\n\0"):  # the value is a secret: never echoed
            raise bad("headers", f"the value of {k} must be a string on one line")
        out[k] = v
    return out


def _schema(schema: dict[str, Any], bad: Callable[[str, str], RouteError]) -> dict[str, Any]:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        at = "/".join(str(p) for p in exc.absolute_path)
        raise bad("schema", f"not a valid JSON Schema{' at ' + at if at else ''}: {exc.message}") from None
    if schema.get("type") != "object":
        raise bad("schema", "type must be \"object\": an input is an object of named fields")
    if "additionalProperties" not in schema and "unevaluatedProperties" not in schema:
        # as for a MicroCore's model: a field the input does not declare is refused (`unknown field 'x'`)
        schema = {**schema, "additionalProperties": False}
    Draft202012Validator(schema, format_checker=FormatChecker())  # builds: refs resolve
    return schema


def _url(url: str, kind: str, schema: dict[str, Any], bad: Callable[[str, str], RouteError]) -> None:
    fields = PLACEHOLDER.findall(url)
    template = PLACEHOLDER.sub("x", url)
    if "{" in template or "}" in template:
        raise bad("url", "has an unmatched { or }: a path parameter is {field}")
    try:
        parts = urlsplit(template)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise bad("url", f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad("url", f"{url!r} must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise bad("url", "credentials in the URL would be shown in listings: send them in headers (secrets)")
    if parts.fragment:
        raise bad("url", "has a #fragment, which is never sent to a server")
    head = url.split("://", 1)[1].split("/", 1)[0]
    if "{" in head or "?" in url and "{" in url.split("?", 1)[1]:
        raise bad("url", "a {field} may stand only in the path (not in the host, port or query): "
                         "a caller must not choose where the call goes")
    props = schema.get("properties", {})
    required = set(schema.get("required", []))
    for f in fields:
        if not FIELD_NAME.match(f):
            raise bad("url", f"{{{f}}} is not a field name")
        if f not in props or f not in required:
            raise bad("url", f"missing {{{f}}} in the schema: a path parameter must be a required property "
                             f"of [route.schema] (required = [\"{f}\"], properties.{f})")
    if len(set(fields)) != len(fields):
        raise bad("url", "a {field} appears twice")
    if kind == "path":
        if not fields:
            raise bad("input", "is \"path\" but the url has no {field} to take it")
        extra = sorted(set(props) - set(fields))
        if extra:
            raise bad("input", f"is \"path\" but the schema's {extra[0]!r} has no {{{extra[0]}}} in the url "
                               "(use input = \"query\" or \"json\" for the fields beside the path's)")


def parse_text(text: str, source: str = "the routes file") -> list[Route]:
    """Every route of a TOML text, checked; RouteError at the first that is wrong (nothing applies)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RouteError(f"{source} is not valid TOML: {exc}") from None
    extra = sorted(set(doc) - {"route"})
    if extra:
        raise RouteError(f"{source}: unknown top-level key {extra[0]!r}: routes are [[route]] tables")
    tables = doc.get("route", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RouteError(f"{source}: routes are [[route]] tables (an array of tables)")
    if not tables:
        raise RouteError(f"{source} declares no route: add a [[route]] table")
    routes = [check(t, i) for i, t in enumerate(tables)]
    seen: set[str] = set()
    for r in routes:
        if r.name in seen:
            raise RouteError(f"route {r.name!r}: name: declared twice in {source}", field="name")
        seen.add(r.name)
    return routes


def parse_file(path: str | Path) -> list[Route]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RouteError(f"cannot read {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RouteError(f"{p} is not UTF-8 text") from None
    return parse_text(text, str(p))


def from_spec(spec: pb.RouteSpec, index: int = 0) -> Route:
    """A route as it came over the wire, checked again (the coordinator trusts no client's parsing)."""
    try:
        schema = json.loads(spec.schema_json) if spec.schema_json else None
    except ValueError:
        raise RouteError(f"route {spec.name!r}: schema: not JSON", field="schema") from None
    raw: dict[str, Any] = {"name": spec.name, "url": spec.url, "method": spec.method or "GET",
                           "input": spec.input or "query", "pure": spec.pure, "headers": dict(spec.headers),
                           "schema": schema, "description": spec.description}
    if spec.timeout_s:
        raw["timeout"] = spec.timeout_s
    if spec.cache_ttl_s:
        raw["cache_ttl"] = spec.cache_ttl_s
    if spec.max_response_bytes:
        raw["max_response"] = spec.max_response_bytes
    return check(raw, index)


class RouteTable:
    """The routes in force, by name, and their file. Changes are whole (`apply`): the file is written
    first (a temporary file renamed over it), then the table swapped, so a crash leaves one or the other."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / ROUTES_FILE
        self.routes: dict[str, Route] = {}
        self.listeners: list[Callable[[], None]] = []  # called after every change (the gateway's documents)

    def __contains__(self, name: object) -> bool:
        return name in self.routes

    def __len__(self) -> int:
        return len(self.routes)

    def get(self, name: str) -> Route | None:
        return self.routes.get(name)

    def current(self) -> list[Route]:
        return sorted(self.routes.values(), key=lambda r: r.name)

    def load(self, taken: Callable[[str], bool] = lambda name: False) -> None:
        """Routes as the last apply left them; one that no longer checks, or whose name a published
        service has taken meanwhile (`taken`), is skipped, loudly."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("routes not loaded: %s is unreadable (%s); no route is served until `routes apply`",
                      self.path, exc)
            return
        for i, rec in enumerate(data.get("routes", [])):
            try:
                r = check(rec["definition"], i)
                if taken(r.name):
                    raise RouteError(f"route {r.name!r}: a published service has that name now")
                self.routes[r.name] = replace(r, revision=int(rec.get("revision", 1)),
                                              applied_at=float(rec.get("applied_at", 0.0)))
            except (RouteError, KeyError, TypeError, ValueError) as exc:
                log.error("route #%d in %s not loaded: %s", i + 1, self.path, exc)
        if self.routes:
            log.info("%d route(s) loaded: %s", len(self.routes), ", ".join(sorted(self.routes)))

    def _save(self, routes: dict[str, Route]) -> None:
        body = json.dumps({"routes": [{"definition": r.definition(), "revision": r.revision,
                                       "applied_at": r.applied_at} for r in sorted(routes.values(),
                                                                                   key=lambda r: r.name)]},
                          indent=1).encode()
        tmp = self.path.with_name(f".{ROUTES_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def apply(self, routes: list[Route], taken: Callable[[str], bool], prune: bool = False
              ) -> dict[str, list[str]]:
        """Add or replace `routes` together (and with `prune` remove the others); RouteError, with
        nothing changed, when a name is taken by a published service (`taken`) or repeated."""
        names = [r.name for r in routes]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise RouteError(f"route {dup!r}: name: given twice", field="name")
        for r in routes:
            if taken(r.name):
                raise RouteError(f"route {r.name!r}: name: a published service is called {r.name}; a route "
                                 "cannot take its name (choose another, or unpublish the service first)",
                                 field="name")
        if len(set(self.routes) | set(names)) > MAX_ROUTES and not prune:
            raise RouteError(f"more than {MAX_ROUTES} routes: remove some first")
        out: dict[str, list[str]] = {"added": [], "changed": [], "unchanged": [], "removed": []}
        new = {} if prune else dict(self.routes)
        now = time.time()
        for r in routes:
            cur = self.routes.get(r.name)
            if cur is not None and cur.same(r):
                new[r.name] = cur
                out["unchanged"].append(r.name)
                continue
            rev = cur.revision + 1 if cur is not None else 1
            new[r.name] = replace(r, revision=rev, applied_at=now)
            out["changed" if cur is not None else "added"].append(r.name)
        out["removed"] = sorted(set(self.routes) - set(new))
        if out["added"] or out["changed"] or out["removed"]:
            self._save(new)
            self.routes = new
            self._changed()
        return out

    def remove(self, name: str) -> Route:
        r = self.routes.get(name)
        if r is None:
            known = ", ".join(sorted(self.routes)[:20]) or "none"
            raise RouteError(f"no route named {name!r}; routes: {known}", field="name")
        new = {k: v for k, v in self.routes.items() if k != name}
        self._save(new)
        self.routes = new
        self._changed()
        return r

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()
