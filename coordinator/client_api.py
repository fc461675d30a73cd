"""The client API of the coordinator (the `Coordinator` gRPC service): unary calls, the call stream
with batching and cancellation, status, publishing, and OAuth through TokenService."""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
from typing import TYPE_CHECKING, Any, Callable, cast

import grpc
from grpc import aio

from microcores import _codec
from microcores._chunks import STREAM_MIN, Assembler, batch_parts, call_pieces, pieces
from microcores.errors import MicroError, Unavailable
from microswarm.protos import microswarm_pb2 as pb
from microswarm.protos import microswarm_pb2_grpc as pbg

from .auth import OPERATOR, AuthError
from .auth_grpc import TokenService, auth_refusal, caller_label, text_metadata
from .caller import Caller
from .forward import arriving
from .calls import StoredCall
from .outflow import DOWN_WINDOW, OUTFLOW, Outflow
from .spool import Spool

if TYPE_CHECKING:
    from .server import Coordinator

MAX_RESULT_WAIT_S = 60.0  # one Result RPC waits at most this long; clients wait longer by asking again
STATUS_SCOPE = "status"  # a client token whose scope covers this name may read Status and CacheStats
MAX_STREAM_IN_FLIGHT = 4096
REPLIES_FIELD = pb.ReplyBatch.DESCRIPTOR.fields_by_name["replies"].number
STREAM_BATCH_BYTES = 1 << 20
_EMPTY = object()
MAX_INFLOWS = 16  # large inputs arriving at once on one stream (each spooled to disk, up to MAX_PAYLOAD)
# Under load a reply waits STREAM_LINGER_S for the other calls in flight on its stream, so that more
# replies share one write: each gRPC write costs the coordinator and the client far more CPU than a
# reply. Never when it is the only call in flight (a lone call is answered at once).
STREAM_LINGER_S = 0.001


async def _now(reply: pb.CallReply) -> pb.CallReply:
    return reply


class ClientService(TokenService, pbg.CoordinatorServicer):
    def __init__(self, c: Coordinator) -> None:
        self.c = c

    async def Call(self, request: pb.CallRequest, context: aio.ServicerContext) -> pb.CallReply:
        md = text_metadata(context)
        request.ClearField("chain")  # only the coordinator sets the chain of nested calls
        client = "anonymous"
        try:  # every call needs a bearer token whose scope covers the service
            token = self.c.auth.verify(md.get("authorization"))
            client = caller_label(token, md.get("x-client", ""))
            self.c.auth.check(token, request.service)
        except AuthError as exc:
            return auth_refusal(self.c, request.service, exc, client=client, address=context.peer())
        return await self.c.dispatcher.call(request, caller=self._caller(token, request, client, context.peer()))

    def _caller(self, token: Any, req: pb.CallRequest, client: str, peer: str) -> Caller:
        """Who the call runs as; a call another coordinator of the cluster sent on runs as its
        original client (forward.arriving)."""
        caller = arriving(token, req, Caller(client, token, peer))
        fw = self.c.dispatcher.forwarder
        if req.forwarded_by and fw is not None:
            fw.counts["received"] += 1
        return caller

    async def Submit(self, request: pb.CallRequest, context: aio.ServicerContext) -> pb.SubmitReply:
        """Start a call and answer its id at once (coordinator/calls.py); refusals are answered as the
        call's envelope, so a submit never fails for what a call would answer with an error."""
        md = text_metadata(context)
        request.ClearField("chain")
        client, token = "anonymous", None
        try:
            token = self.c.auth.verify(md.get("authorization"))
            client = caller_label(token, md.get("x-client", ""))
            self.c.auth.check(token, request.service)
        except AuthError as exc:
            if token is None:  # no valid token at all: nothing to keep a result for
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{exc.error}: {exc.description}")
            refusal = auth_refusal(self.c, request.service, exc, client=client, address=context.peer())
            call = self.c.calls.submit(token.client_id, request.service, lambda _cid: _now(refusal))
            return pb.SubmitReply(call_id=call.call_id)
        caller = self._caller(token, request, client, context.peer())
        try:
            call = self.c.calls.submit(token.client_id, request.service,
                                       lambda cid: self.c.dispatcher.call(request, caller=caller, call_id=cid))
        except MicroError as exc:  # overloaded
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc.code}: {exc.message}")
        return pb.SubmitReply(call_id=call.call_id)

    async def _owner(self, context: aio.ServicerContext) -> str:
        try:
            token = self.c.auth.verify(text_metadata(context).get("authorization"))
        except AuthError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{exc.error}: {exc.description}")
        return token.client_id

    async def _stored(self, context: aio.ServicerContext, call_id: str,
                      lookup: Callable[[str, str], StoredCall]) -> StoredCall:
        """The caller's submitted call (`calls.get` or `calls.cancel`); NOT_FOUND `unknown_call` otherwise."""
        owner = await self._owner(context)
        try:
            return lookup(call_id, owner)
        except MicroError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{exc.code}: {exc.message}")
            raise  # (abort raises)

    async def Result(self, request: pb.ResultRequest, context: aio.ServicerContext) -> pb.ResultReply:
        call = await self._stored(context, request.call_id, self.c.calls.get)
        await self.c.calls.wait(call, min(max(request.wait_s, 0.0), MAX_RESULT_WAIT_S))
        return call.answer()

    async def Cancel(self, request: pb.CancelRequest, context: aio.ServicerContext) -> pb.ResultReply:
        call = await self._stored(context, request.call_id, self.c.calls.cancel)
        await self.c.calls.wait(call, 5.0)  # the job's stop is quick; answer with the final state
        return call.answer()

    async def CallStream(self, request_iterator: Any, context: aio.ServicerContext) -> None:
        """Calls multiplexed on one stream; replies are batched in completion order."""
        md = text_metadata(context)
        peer = context.peer()
        token: Any = None
        refusal: AuthError | None = None
        client = "anonymous"
        try:  # the stream's token, checked again (expiry, revocation, scope) for each call
            token = self.c.auth.verify(md.get("authorization"))
            client = caller_label(token, md.get("x-client", ""))
        except AuthError as exc:
            refusal = exc
        outbox: asyncio.Queue[tuple[int, pb.CallReply | pb.StreamChunk] | None] = asyncio.Queue()
        tasks: dict[int, asyncio.Task[None]] = {}  # the client's id -> its call in flight

        inflows: dict[int, Spool] = {}  # calls whose input is still arriving (CallRequest.input_size)

        window = asyncio.Semaphore(DOWN_WINDOW)  # pieces of large results queued for the stream

        async def down(chunk: pb.StreamChunk) -> None:
            await window.acquire()
            outbox.put_nowait((chunk.call, chunk))

        async def one(cid: int, req: pb.CallRequest, caller: Caller, inflow: Spool | None) -> None:
            req.ClearField("chain")
            outflow = Outflow(cid, down)
            as_outflow = OUTFLOW.set(outflow)  # the call's jobs pass a large output on as it comes
            try:
                reply = await self.c.dispatcher.call(req, caller=caller, inflow=inflow)
                await outflow.finish(reply)
            finally:
                OUTFLOW.reset(as_outflow)
                outflow.close()
                if inflow is not None:
                    inflow.close()
                    if inflows.get(cid) is inflow:
                        del inflows[cid]
            task = asyncio.current_task()
            if task is None or not task.cancelling():  # a call the client cancelled gets no reply
                outbox.put_nowait((cid, reply))

        def forget(cid: int, t: asyncio.Task[None]) -> None:
            if tasks.get(cid) is t:
                del tasks[cid]

        async def sender() -> None:
            nxt: Any = _EMPTY  # an item taken from the outbox that goes after the batch being written
            while True:
                item = await outbox.get() if nxt is _EMPTY else nxt
                nxt = _EMPTY
                if item is None:
                    return
                if isinstance(item[1], pb.StreamChunk):  # a piece of a large result (outflow.py)
                    await context.write(item[1])
                    window.release()
                    continue
                await asyncio.sleep(0)  # one loop turn: replies finishing together share a write
                if len(tasks) > outbox.qsize() + 1:  # other calls are still running
                    await asyncio.sleep(STREAM_LINGER_S)
                batch = pb.ReplyBatch()
                replies: list[bytes] = []  # serialized once, not copied into the batch (batch_parts)
                size = 0
                while True:
                    cid, reply = item[0], cast(pb.CallReply, item[1])
                    if reply.ByteSize() > STREAM_MIN and len(reply.result) > STREAM_MIN:  # pieces ahead of it
                        result = reply.result
                        reply.ClearField("result")
                        reply.result_size = len(result)
                        for chunk in call_pieces(cid, result, restart=True):  # (any passed on before: dropped)
                            await context.write(chunk)
                        del result
                    batch.ids.append(cid)
                    replies.append(reply.SerializeToString())
                    size += len(replies[-1]) + 8
                    if size > STREAM_BATCH_BYTES or outbox.empty():
                        break
                    item = outbox.get_nowait()
                    if item is None or isinstance(item[1], pb.StreamChunk):
                        nxt = item  # written after this batch, in order
                        break
                for chunk in pieces(batch_parts(batch.SerializeToString(), REPLIES_FIELD, replies)):
                    await context.write(chunk)

        send_task = asyncio.create_task(sender())
        assembler = Assembler()
        try:
            while True:
                chunk = await context.read()
                if not isinstance(chunk, pb.StreamChunk):
                    break
                if chunk.call:  # a piece of a large input (of a call refused or ended already: dropped)
                    inflow = inflows.get(chunk.call)
                    if inflow is not None:
                        inflow.feed(chunk.data)
                        if not chunk.more:
                            inflow.end()
                            del inflows[chunk.call]
                    continue
                data = assembler.feed(chunk)
                if data is None:
                    continue
                batch = pb.CallBatch.FromString(data)
                if batch.authorization:  # the client renewed its token
                    try:
                        token = self.c.auth.verify(batch.authorization)
                        client = caller_label(token, md.get("x-client", ""))
                    except AuthError as exc:
                        token, refusal, client = None, exc, "anonymous"
                for cid, req in zip(batch.ids, batch.calls):
                    if len(tasks) >= MAX_STREAM_IN_FLIGHT:
                        outbox.put_nowait((cid, pb.CallReply(status="error", service=req.service,
                                                             executed_by="coordinator", error=pb.Error(
                            code="unavailable", message=f"more than {MAX_STREAM_IN_FLIGHT} calls in flight "
                                                        "on one stream; wait for some answers"))))
                        continue
                    try:
                        if token is None:
                            raise refusal or AuthError("missing_token", "no bearer token", 401)
                        self.c.auth.check(token, req.service)
                    except AuthError as exc:
                        outbox.put_nowait((cid, auth_refusal(self.c, req.service, exc, client=client, address=peer)))
                        continue
                    inflow = None
                    if req.input_size:
                        refused = None
                        if req.input_size > _codec.MAX_PAYLOAD:
                            refused = pb.Error(code="too_large", message=f"an input of {req.input_size} bytes "
                                                                         f"exceeds the limit of {_codec.MAX_PAYLOAD}")
                        elif len(inflows) >= MAX_INFLOWS or cid in inflows:
                            refused = pb.Error(code="unavailable", message=f"more than {MAX_INFLOWS} large inputs "
                                               "arriving at once on one stream; wait for some answers")
                        if refused is not None:
                            outbox.put_nowait((cid, pb.CallReply(status="error", service=req.service,
                                                                 executed_by="coordinator", error=refused)))
                            continue
                        inflow = inflows[cid] = Spool(req.input_size, f"the input of {req.service}")
                    t = asyncio.create_task(one(cid, req, self._caller(token, req, client, peer), inflow))
                    tasks[cid] = t
                    t.add_done_callback(functools.partial(forget, cid))
                for cid in batch.cancel:  # calls the client gave up on: their jobs stop (the dispatcher's part)
                    if cid in tasks:
                        tasks[cid].cancel()
            while tasks:  # the client finished sending: answer everything it asked
                await asyncio.wait(list(tasks.values()))
            outbox.put_nowait(None)  # type: ignore[arg-type]
            await send_task
        finally:
            send_task.cancel()
            for t in list(tasks.values()):
                t.cancel()
            for inflow in inflows.values():  # the client left mid-input: its calls end with it
                inflow.fail(Unavailable("the client's stream ended before the input was complete"))

    async def _viewer(self, context: aio.ServicerContext, what: str) -> bool:
        """Who may look at Status/CacheStats: True for the operator (`Admin <admin.token>`, or a
        bearer token of the operator client), False for a client whose token's scope covers
        `status`; anyone else is refused (UNAUTHENTICATED without a valid token, PERMISSION_DENIED
        when its scope lacks `status`)."""
        auth = text_metadata(context).get("authorization", "")
        if auth.startswith("Admin "):
            if self._admin(context) is not None:
                return True
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{what} refused: wrong admin credential (is --state-dir the coordinator's?)")
        try:
            token = self.c.auth.verify(auth or None)
        except AuthError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, (
                f"{what} needs the operator's admin credential (run where the coordinator's state directory "
                "is readable: --state-dir or MICROSWARM_STATE_DIR) or a bearer token of a client with the "
                f"scope 'status' (microswarm clients create NAME --scope status): {exc.description}"))
        if token.client_id == OPERATOR:
            return True
        if not token.permits(STATUS_SCOPE):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, (
                f"{what} needs a token whose scope covers 'status'; this client's scope is "
                f"{' '.join(token.scopes)} (create a client with --scope status)"))
        return False

    async def Status(self, request: pb.StatusRequest, context: aio.ServicerContext) -> pb.StatusReply:
        """Everything for the operator; a client with the scope `status` gets volunteers' ids and
        addresses hidden (Coordinator.status); anyone else is refused (_viewer)."""
        operator = await self._viewer(context, "status")
        return self.c.status(request.recent_calls, operator=operator, offset=request.agents_offset,
                             limit=request.agents_limit)

    async def CacheStats(self, request: pb.CacheStatsRequest, context: aio.ServicerContext) -> pb.CacheStatsReply:
        await self._viewer(context, "cache stats")
        return pb.CacheStatsReply(json=json.dumps(self.c.cache_stats()).encode())

    async def Publish(self, request: pb.PublishRequest, context: aio.ServicerContext) -> pb.PublishReply:
        auth = text_metadata(context).get("authorization", "")
        admin = self.c.admin_credential()
        if not (auth.startswith("Admin ") and admin and hmac.compare_digest(auth[6:].encode(), admin.encode())):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "publishing needs the operator's admin credential from the coordinator's "
                                "state directory (pass --state-dir or set MICROSWARM_STATE_DIR)")
        try:
            entry, unchanged = await asyncio.get_running_loop().run_in_executor(
                None, self.c.registry.publish, request.manifest, request.archive,
                request.publisher_signature)
        except MicroError as exc:  # PackageError among them
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        return pb.PublishReply(name=entry.name, version=entry.version, digest=entry.digest,
                               revision=entry.revision, unchanged=unchanged)
