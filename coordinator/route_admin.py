"""The operator's side of routes: the `Routes` gRPC service (Apply, List, Remove, with the admin
credential, like Publish) and what routes add to /openapi.json.

Routes are declared by the operator only: no client, whatever its scope, can add one or change where
one goes; that is what keeps the gateway from becoming a way to reach any address from inside the
operator's network. Their header values go in with Apply and come out nowhere.
"""
from __future__ import annotations

import copy
import hmac
import logging
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from microswarm.protos import microswarm_pb2 as pb
from microswarm.protos import microswarm_pb2_grpc as pbg

from .auth_grpc import text_metadata
from .routes import Route, RouteError, from_spec

if TYPE_CHECKING:
    from .server import Coordinator

log = logging.getLogger("microswarm.routes")


class RoutesService(pbg.RoutesServicer):
    def __init__(self, c: "Coordinator") -> None:
        self.c = c

    async def _operator(self, context: aio.ServicerContext, what: str) -> None:
        auth = text_metadata(context).get("authorization", "")
        admin = self.c.admin_credential()
        if not (auth.startswith("Admin ") and admin and hmac.compare_digest(auth[6:].encode(), admin.encode())):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{what} needs the operator's admin credential from the coordinator's state "
                                "directory (pass --state-dir or set MICROSWARM_STATE_DIR)")

    async def Apply(self, request: pb.ApplyRoutesRequest, context: aio.ServicerContext) -> pb.ApplyRoutesReply:
        await self._operator(context, "applying routes")
        if not request.routes and not request.prune:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no route given")
        try:
            routes = [from_spec(s, i) for i, s in enumerate(request.routes)]
            done = self.c.routes.apply(routes, lambda name: name in self.c.registry.services, request.prune)
        except RouteError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        except OSError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"routes not saved ({exc}); nothing changed")
        log.info("routes applied: %s", ", ".join(f"{k} {' '.join(v)}" for k, v in done.items() if v) or "no change",
                 extra={"event": "routes_applied"})
        return pb.ApplyRoutesReply(**done)

    async def List(self, request: pb.ListRoutesRequest, context: aio.ServicerContext) -> pb.ListRoutesReply:
        await self._operator(context, "listing routes")
        return pb.ListRoutesReply(routes=[r.info() for r in self.c.routes.current()])

    async def Remove(self, request: pb.RemoveRouteRequest, context: aio.ServicerContext) -> pb.RemoveRouteReply:
        await self._operator(context, "removing a route")
        try:
            route = self.c.routes.remove(request.name)
        except RouteError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, exc.message)
        except OSError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"routes not saved ({exc}); nothing changed")
        log.info("route %s removed", route.name, extra={"event": "route_removed"})
        return pb.RemoveRouteReply(route=route.info())


def document(doc: dict[str, Any], routes: list[Route]) -> dict[str, Any]:
    """Add the routes to an OpenAPI document (openapi.build's): each as its own operation(s) at
    /v1/group/function, its JSON Schema as the request body (and as query parameters for GET when
    every field is a scalar), its result the source's JSON. Header names and values stay out."""
    from .route_input import InputSchema

    components = doc["components"]["schemas"]
    scopes = doc["components"]["securitySchemes"]["oauth2"]["flows"]["clientCredentials"]["scopes"]
    tags = {t["name"] for t in doc["tags"]}
    errors = _errors(doc)
    for r in routes:
        group, function = r.name.split(".", 1)
        if group not in tags:
            doc["tags"].append({"name": group, "description": f"the {group} services"})
            tags.add(group)
        scopes.setdefault(f"{group}.*", f"every {group} service")
        scopes[r.name] = f"{r.name} only"
        schema = copy.deepcopy(r.schema)
        schema.setdefault("title", f"{r.name} input")
        components[f"{r.name}.In"] = schema
        env = f"{r.name}.Envelope"
        components[env] = {
            "type": "object", "required": ["status", "result", "executed_by", "attempts", "process_time_ms",
                                           "cache_hit"],
            "properties": {"status": {"const": "ok"},
                           "result": {"description": "the source's JSON answer, as it is"},
                           **_envelope_fields(doc),
                           "upstream_status": {"type": "integer", "description": "the source's HTTP status"}}}
        facts = [f"version {r.version}", f"timeout {r.timeout:g} s", "run by the coordinator: a route to an "
                 "existing web service (executed_by `upstream`)"]
        if r.pure:
            facts.append("pure (answers may come from the cache)")
        description = (r.description + "\n\n" if r.description else "") + ", ".join(facts) + "."
        summary = r.description.split("\n")[0] if r.description else f"{r.name} (route)"
        ok = {"200": {"description": "the envelope with the source's answer",
                      "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{env}"}}}}}
        security = [{"oauth2": [r.name]}, {"bearer": []}]
        op = f"{group}_{function}"
        item: dict[str, Any] = {"post": {
            "operationId": f"{op}_post", "tags": [group], "summary": summary, "description": description,
            "security": security,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{r.name}.In"}}}},
            "responses": {**ok, **errors}}}
        if InputSchema(r.schema).scalar:
            required = set(r.schema.get("required", []))
            params = [{"name": n, "in": "query", "required": n in required, "schema": s}
                      for n, s in r.schema.get("properties", {}).items()]
            item["get"] = {"operationId": f"{op}_get", "tags": [group], "summary": summary,
                           "description": description + " The same call with query parameters.",
                           "security": security, "parameters": params, "responses": {**ok, **errors}}
        doc["paths"][f"/v1/{group}/{function}"] = item
    groups = sorted((t for t in doc["tags"] if t["name"] != "oauth"), key=lambda t: t["name"])
    doc["tags"] = groups + [t for t in doc["tags"] if t["name"] == "oauth"]  # groups in order, as for services
    return doc


def _envelope_fields(doc: dict[str, Any]) -> dict[str, Any]:
    props = doc["components"]["schemas"]["ErrorEnvelope"]["properties"]
    return {k: v for k, v in props.items() if k not in ("status", "error")}


def _errors(doc: dict[str, Any]) -> dict[str, Any]:
    """The error answers of a service's operation (any one's), with the routes' own."""
    ref = {"$ref": "#/components/schemas/ErrorEnvelope"}
    out: dict[str, Any] = {}
    for item in doc["paths"].values():
        post = item.get("post", {})
        if post.get("operationId", "").endswith("_post") and "requestBody" in post:
            out = {k: v for k, v in post["responses"].items() if k not in ("200", "202")}
            break
    out["4XX"] = {"description": "upstream_error: the source answered this 4xx (its status, passed through; "
                                 "`upstream_status` in the envelope too)", "content": {"application/json":
                                                                                       {"schema": ref}}}
    out["502"] = {"description": "upstream_error: the source answered an error status (5xx, or a redirect); "
                                 "a 4xx of the source is answered with that status", "content": {"application/json":
                                                                                                 {"schema": ref}}}
    out["503"] = {"description": "upstream_unavailable: the source cannot be reached; or the coordinator is stopping",
                  "content": {"application/json": {"schema": ref}}}
    out["504"] = {"description": "deadline_exceeded: the source did not answer within the route's timeout",
                  "content": {"application/json": {"schema": ref}}}
    return out
