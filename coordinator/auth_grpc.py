"""The gRPC side of client authentication: token RPCs, client admin RPCs, refusals as envelopes.

A call refused for its token is answered like any other call: a `CallReply` envelope with
status "error" and code `unauthenticated` (missing, unknown, expired or revoked token) or
`forbidden` (the service is outside the token's scope), and it goes into the call log. So a
refusal looks the same over gRPC, over a multiplexed stream and over HTTP (where it is a 401 or
403), and a client can tell it from a transport failure. The token RPCs themselves (`Token`,
`Revoke`) and the operator's client RPCs answer refusals as gRPC statuses (UNAUTHENTICATED,
PERMISSION_DENIED, INVALID_ARGUMENT), their details starting with the OAuth error code.
"""
from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from microcores.errors import Unavailable
from microswarm.protos import microswarm_pb2 as pb

from .auth import OPERATOR, AuthError, ClientRecord, Token
from .calllog import CallEntry

if TYPE_CHECKING:
    from .server import Coordinator


def peer_host(peer: str) -> str:
    """The address of a gRPC peer without its port ("ipv4:1.2.3.4:5678" -> "ipv4:1.2.3.4")."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def text_metadata(context: aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """A call's text metadata: its (key, value) pairs as a dict, less binary (`-bin`) values."""
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def caller_label(token: Token, hint: str) -> str:
    """Who the call log names: the authenticated client id (the operator's tools add their hint)."""
    if token.client_id == OPERATOR and hint:
        return f"{OPERATOR}:{hint}"[:80]
    return token.client_id


def refuse(c: "Coordinator", service: str, code: str, message: str, *, client: str, address: str,
           field: str = "", t0: float | None = None) -> pb.CallReply:
    """An error envelope for a call the coordinator refused before dispatch, logged like any call."""
    ms = (time.perf_counter() - t0) * 1000 if t0 is not None else 0.0
    reply = pb.CallReply(status="error", service=service, executed_by="coordinator", process_time_ms=ms,
                         error=pb.Error(code=code, message=message, field=field))
    entry = CallEntry(time.time(), client or "anonymous", address, service, "-", False, ms, code, 0, False)
    c.calllog.add(entry)
    for observer in c.dispatcher.observers:
        observer(entry, reply)
    return reply


def auth_refusal(c: "Coordinator", service: str, exc: AuthError, *, client: str, address: str,
                 t0: float | None = None) -> pb.CallReply:
    return refuse(c, service, exc.code, exc.description, client=client, address=address, t0=t0)


def _client_info(d: dict[str, Any]) -> pb.ClientInfo:
    return pb.ClientInfo(client_id=d["client_id"], name=d["name"], scopes=d["scopes"], created=d["created"],
                         revoked=d["revoked"] or 0.0)


def _public(rec: ClientRecord) -> pb.ClientInfo:
    return _client_info(rec.public())


class TokenService:
    """Mixed into the Coordinator servicer: Token, Revoke, CreateClient, ListClients, RevokeClient."""

    c: "Coordinator"

    def _admin(self, context: aio.ServicerContext) -> str | None:
        """The admin credential presented in metadata, if it is the right one."""
        auth = text_metadata(context).get("authorization", "")
        admin = self.c.admin_credential()
        if auth.startswith("Admin ") and admin and hmac.compare_digest(auth[6:].encode(), admin.encode()):
            return auth[6:]
        return None

    async def _need_admin(self, context: aio.ServicerContext) -> None:
        if self._admin(context) is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "managing clients needs the operator's admin credential from the coordinator's "
                                "state directory (pass --state-dir or set MICROSWARM_STATE_DIR)")

    @staticmethod
    async def _abort(context: aio.ServicerContext, exc: AuthError) -> None:
        code = grpc.StatusCode.UNAUTHENTICATED if exc.status == 401 else grpc.StatusCode.INVALID_ARGUMENT
        if exc.status == 429:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.send_initial_metadata((("retry-after", str(max(1, int(exc.retry_after + 0.999)))),))
        await context.abort(code, f"{exc.error}: {exc.description}")

    async def Token(self, request: pb.TokenRequest, context: aio.ServicerContext) -> pb.TokenReply:
        a = self.c.auth
        try:
            if request.grant_type == "client_credentials" and not request.client_id:
                md = text_metadata(context).get("authorization", "")
                if not md.startswith("Admin "):
                    a.limit_token_requests(peer_host(context.peer()))
                    raise AuthError("invalid_client", "no client id: pass a client id and secret "
                                                      "(microswarm clients create NAME)", 401)
                if self._admin(context) is None:  # the operator's own tools are not limited; guesses are
                    a.limit_token_requests(peer_host(context.peer()))
                answer = a.operator_grant(self.c.admin_credential(), md[6:])
            elif request.grant_type in ("client_credentials", "refresh_token"):
                a.limit_token_requests(peer_host(context.peer()), request.client_id)
                client = a.authenticate(request.client_id, request.client_secret)
                if request.grant_type == "client_credentials":
                    answer = a.client_credentials(client, request.scope or None)
                else:
                    answer = a.refresh(client, request.refresh_token, request.scope or None)
            else:
                raise AuthError("unsupported_grant_type",
                                "grant_type must be client_credentials or refresh_token", 400)
        except AuthError as exc:
            await self._abort(context, exc)
        return pb.TokenReply(access_token=answer["access_token"], token_type=answer["token_type"],
                             expires_in=float(answer["expires_in"]), scope=answer["scope"],
                             refresh_token=answer.get("refresh_token", ""))

    async def Revoke(self, request: pb.RevokeRequest, context: aio.ServicerContext) -> pb.RevokeReply:
        try:
            client = None if (not request.client_id and self._admin(context)) else \
                self.c.auth.authenticate(request.client_id, request.client_secret)
        except AuthError as exc:
            await self._abort(context, exc)
        self.c.auth.revoke(client, request.token, request.token_type_hint)
        return pb.RevokeReply()

    async def CreateClient(self, request: pb.CreateClientRequest,
                           context: aio.ServicerContext) -> pb.CreateClientReply:
        await self._need_admin(context)
        try:
            rec, secret = self.c.auth.create_client(request.name, list(request.scopes))
        except Unavailable as exc:  # --state-url: the database is away (pgstate.StoreUnavailable); not
            # UNAVAILABLE, which says the coordinator itself cannot be reached
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.message)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.CreateClientReply(client=_public(rec), client_secret=secret)

    async def ListClients(self, request: pb.ListClientsRequest, context: aio.ServicerContext) -> pb.ListClientsReply:
        await self._need_admin(context)
        return pb.ListClientsReply(clients=[_client_info(d) for d in self.c.auth.list_clients()])

    async def RevokeClient(self, request: pb.RevokeClientRequest,
                           context: aio.ServicerContext) -> pb.RevokeClientReply:
        await self._need_admin(context)
        try:
            rec = self.c.auth.revoke_client(request.client)
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.message)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, exc.args[0])
        return pb.RevokeClientReply(client=_public(rec))
