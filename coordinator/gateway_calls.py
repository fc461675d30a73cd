"""Submitted calls over HTTP: `POST /v1/group/function?async=1` answers 202 with the call's id,
`GET /v1/calls/ID` its envelope (202 while it runs; `?wait=S` waits up to S s, at most 60), and
`DELETE /v1/calls/ID` cancels it. Only the client that submitted a call finds it (calls.py)."""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from microcores.errors import MicroError
from microswarm.protos import microswarm_pb2 as pb

from .auth import AuthError
from .caller import Caller
from .calls import PENDING, StoredCall

if TYPE_CHECKING:
    from .gateway import Gateway

MAX_WAIT_S = 60.0
ASYNC_VALUES = ("1", "true", "yes")


def wants_async(request: web.Request) -> bool:
    return request.method == "POST" and request.query.get("async", "").lower() in ASYNC_VALUES


def _pending(call: StoredCall) -> web.Response:
    body = {"call_id": call.call_id, "status": PENDING, "service": call.service,
            "age_s": round(time.monotonic() - call.created, 3), "progress": round(call.progress, 4),
            "message": call.message, "url": f"/v1/calls/{call.call_id}"}
    return web.json_response(body, status=202, headers={"Location": f"/v1/calls/{call.call_id}",
                                                        "Retry-After": "1", "Cache-Control": "no-store"})


class CallRoutes:
    def __init__(self, gateway: Gateway) -> None:
        self.g = gateway
        self.c = gateway.c

    def register(self, router: web.UrlDispatcher) -> None:
        """Before /v1/{group}/{function}, which `calls/ID` would otherwise match."""
        router.add_route("GET", "/v1/calls/{call_id}", self.get)
        router.add_route("DELETE", "/v1/calls/{call_id}", self.delete)
        router.add_route("*", "/v1/calls/{call_id}", self.wrong_method)

    def submit(self, request: web.Request, req: pb.CallRequest, caller: Caller, owner: str) -> web.Response:
        try:
            call = self.c.calls.submit(owner, req.service,
                                       lambda cid: self.c.dispatcher.call(req, caller=caller, call_id=cid))
        except MicroError as exc:  # overloaded
            return self._error(exc.code, exc.message, 503)
        return _pending(call)

    def _owner(self, request: web.Request) -> str:
        try:
            return self.c.auth.verify(request.headers.get("Authorization")).client_id
        except AuthError as exc:
            raise self.g._auth_exception(exc) from None

    @staticmethod
    def _error(code: str, message: str, status: int) -> web.Response:
        return web.Response(body=json.dumps({"status": "error", "error": {"code": code, "message": message}}),
                            status=status, content_type="application/json", headers={"Cache-Control": "no-store"})

    async def _answer(self, call: StoredCall, t0: float) -> web.Response:
        if call.state == PENDING or call.reply is None:
            return _pending(call)
        return self.g._respond(call.reply, t0)

    async def wrong_method(self, request: web.Request) -> web.Response:
        resp = self._error("method_not_allowed", f"{request.method} on a call: GET gives its envelope, DELETE "
                           "cancels it", 405)
        resp.headers["Allow"] = "GET, DELETE"
        return resp

    async def get(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        owner = self._owner(request)
        try:
            wait = min(MAX_WAIT_S, max(0.0, float(request.query.get("wait", "0") or 0)))
        except ValueError:
            return self._error("invalid_input", f"wait={request.query.get('wait')!r} is not a number of seconds", 400)
        try:
            call = self.c.calls.get(request.match_info["call_id"], owner)
        except MicroError as exc:
            return self._error(exc.code, exc.message, 404)
        await self.c.calls.wait(call, wait)
        return await self._answer(call, t0)

    async def delete(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        owner = self._owner(request)
        try:
            call = self.c.calls.cancel(request.match_info["call_id"], owner)
        except MicroError as exc:
            return self._error(exc.code, exc.message, 404)
        await self.c.calls.wait(call, 5.0)
        return await self._answer(call, t0)


def openapi_paths() -> dict[str, Any]:
    """The /v1/calls/{call_id} operations for /openapi.json."""
    ref = {"type": "object", "description": "the service's envelope (see its own operation for the result's "
                                            "schema)", "required": ["status"]}
    err = {"$ref": "#/components/schemas/ErrorEnvelope"}
    pending = {"type": "object", "properties": {"call_id": {"type": "string"}, "status": {"const": "pending"},
                                                "service": {"type": "string"}, "age_s": {"type": "number"},
                                                "progress": {"type": "number", "minimum": 0, "maximum": 1,
                                                             "description": "the service's last self.progress()"},
                                                "message": {"type": "string", "description": "its message"},
                                                "url": {"type": "string"}}}
    param = {"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}}
    answers = {"200": {"description": "the call's envelope (its HTTP status is the call's, as for a direct call)",
                       "content": {"application/json": {"schema": ref}}},
               "202": {"description": "still running", "content": {"application/json": {"schema": pending}}},
               "401": {"description": "no valid bearer token"},
               "404": {"description": "unknown_call: not this client's, or expired",
                       "content": {"application/json": {"schema": err}}},
               "default": {"description": "the call ended in an error (its envelope, with the HTTP status "
                                          "of that error: 400, 499 cancelled, 500, 503, 504 ...)",
                           "content": {"application/json": {"schema": err}}}}
    return {"/v1/calls/{call_id}": {
        "get": {"summary": "The envelope of a call submitted with ?async=1", "tags": ["calls"],
                "operationId": "calls_get", "security": [{"oauth2": []}],
                "parameters": [param, {"name": "wait", "in": "query", "required": False,
                                       "description": "wait up to this many seconds (at most 60) for it to end",
                                       "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S}}],
                "responses": answers},
        "delete": {"summary": "Cancel a submitted call; its job stops wherever it runs", "tags": ["calls"],
                   "operationId": "calls_cancel", "security": [{"oauth2": []}], "parameters": [param],
                   "responses": answers}}}
