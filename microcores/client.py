"""Calling services from Python: `Client` (blocking) and `AsyncClient` (asyncio), and `publish`.

    from microcores import Client
    with Client("127.0.0.1:7070") as c:
        c.call("math.compute", {"a": 2, "b": 3, "op": "mul"})   # {'result': 6.0}

`call` returns the result or raises the MicroError the envelope carries; `envelope` returns
the whole answer (who ran it, how long it took, whether it came from the cache).
"""
from __future__ import annotations

import asyncio
import getpass
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from protos import microswarm_pb2 as pb
from protos import microswarm_pb2_grpc as pbg

from . import _codec
from ._chunks import Assembler, pieces
from .errors import MicroError, Unavailable, from_code

DEFAULT_COORDINATOR = "127.0.0.1:7070"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", _codec.MAX_PAYLOAD + (1 << 20)),
                   ("grpc.max_send_message_length", _codec.MAX_PAYLOAD + (1 << 20))]


def default_coordinator() -> str:
    return os.environ.get("MICROSWARM_COORDINATOR") or DEFAULT_COORDINATOR


def default_client_name() -> str:
    try:
        return f"python:{getpass.getuser()}"
    except (KeyError, OSError):
        return "python"


@dataclass
class Envelope:
    """The answer to one call, the same over gRPC and HTTP."""

    status: str
    result: Any = None
    error: dict[str, str] | None = None
    executed_by: str = ""
    attempts: int = 0
    process_time_ms: float = 0.0
    cache_hit: bool = False
    service: str = ""
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def unwrap(self) -> Any:
        if self.ok:
            return self.result
        e = self.error or {}
        raise from_code(e.get("code", "error"), e.get("message", ""), e.get("field", ""))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"status": self.status}
        if self.ok:
            d["result"] = self.result
        else:
            d["error"] = self.error
        d.update(executed_by=self.executed_by, attempts=self.attempts,
                 process_time_ms=round(self.process_time_ms, 3), cache_hit=self.cache_hit,
                 service=self.service, version=self.version)
        return d

    @classmethod
    def from_reply(cls, reply: pb.CallReply) -> "Envelope":
        result: Any = None
        error = None
        if reply.status == "ok":
            result = json.loads(reply.result) if reply.encoding == pb.JSON else _codec.unpack(reply.result)
        else:
            error = {"code": reply.error.code, "message": reply.error.message}
            if reply.error.field:
                error["field"] = reply.error.field
        return cls(reply.status, result, error, reply.executed_by, reply.attempts, reply.process_time_ms,
                   reply.cache_hit, reply.service, reply.version)


def _request(service: str, data: Any, encoding: int, timeout: float | None) -> pb.CallRequest:
    if encoding == pb.JSON:
        raw = data if isinstance(data, (bytes, str)) else _codec.dumps_json(data)
        raw = raw.encode() if isinstance(raw, str) else raw
    else:
        if hasattr(data, "model_dump"):
            data = data.model_dump(mode="python")
        raw = _codec.pack(data)
    return pb.CallRequest(service=service, input=raw, encoding=encoding, deadline_s=timeout or 0.0)


def _unavailable(exc: grpc.RpcError, target: str) -> MicroError:
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"cannot reach the coordinator at {target}: is it running? "
                           "(set --coordinator or MICROSWARM_COORDINATOR)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return from_code("deadline_exceeded", f"no answer from the coordinator at {target} in time")
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return from_code("unavailable" if code is None else code.name.lower(), details or str(exc))


class Client:
    def __init__(self, coordinator: str | None = None, *, client_name: str | None = None,
                 bearer: str | None = None) -> None:
        self.target = coordinator or default_coordinator()
        self._channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self._stub = pbg.CoordinatorStub(self._channel)
        self._metadata = [("x-client", client_name or default_client_name())]
        if bearer:
            self._metadata.append(("authorization", f"Bearer {bearer}"))

    def envelope(self, service: str, data: Any = None, *, timeout: float | None = None,
                 encoding: int = pb.MSGPACK) -> Envelope:
        req = _request(service, {} if data is None else data, encoding, timeout)
        try:
            reply = self._stub.Call(req, timeout=(timeout + 5) if timeout else None, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _unavailable(exc, self.target) from None
        return Envelope.from_reply(reply)

    def call(self, service: str, data: Any = None, *, timeout: float | None = None) -> Any:
        return self.envelope(service, data, timeout=timeout).unwrap()

    def status(self, recent_calls: int = 20, timeout: float = 10) -> pb.StatusReply:
        try:
            return self._stub.Status(pb.StatusRequest(recent_calls=recent_calls), timeout=timeout,
                                     metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _unavailable(exc, self.target) from None

    def cache_stats(self, timeout: float = 10) -> dict[str, Any]:
        try:
            reply = self._stub.CacheStats(pb.CacheStatsRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _unavailable(exc, self.target) from None
        return json.loads(reply.json or b"{}")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of Client, for many calls in flight.

    By default its calls share one multiplexed stream (`CallStream`), batched both ways: far
    cheaper per call than one RPC each when many are in flight. `multiplex=False` uses `Call`.
    """

    def __init__(self, coordinator: str | None = None, *, client_name: str | None = None,
                 bearer: str | None = None, multiplex: bool = True) -> None:
        self.target = coordinator or default_coordinator()
        self._channel = aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self._stub = pbg.CoordinatorStub(self._channel)
        self._metadata = [("x-client", client_name or default_client_name())]
        if bearer:
            self._metadata.append(("authorization", f"Bearer {bearer}"))
        self.multiplex = multiplex
        self._stream: asyncio.Task[None] | None = None
        self._call: Any = None
        self._pending: dict[int, asyncio.Future[pb.CallReply]] = {}
        self._next_id = 0

    async def envelope(self, service: str, data: Any = None, *, timeout: float | None = None,
                       encoding: int = pb.MSGPACK) -> Envelope:
        req = _request(service, {} if data is None else data, encoding, timeout)
        if not self.multiplex:
            try:
                reply = await self._stub.Call(req, timeout=(timeout + 5) if timeout else None,
                                              metadata=self._metadata)
            except grpc.RpcError as exc:
                raise _unavailable(exc, self.target) from None
            return Envelope.from_reply(reply)
        if self._stream is None or self._stream.done():
            self._open_stream()
        self._next_id += 1
        cid = self._next_id
        fut: asyncio.Future[pb.CallReply] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        self._queue.put_nowait((cid, req))
        try:
            reply = await asyncio.wait_for(fut, (timeout + 5) if timeout else None)
        finally:
            self._pending.pop(cid, None)
        return Envelope.from_reply(reply)

    def _open_stream(self) -> None:
        self._queue = asyncio.Queue()
        call = self._stub.CallStream(metadata=self._metadata)
        self._call = call

        async def writer() -> None:
            while True:
                cid, req = await self._queue.get()
                batch = pb.CallBatch()
                size = 0
                while True:
                    batch.ids.append(cid)
                    batch.calls.append(req)
                    size += len(req.input) + 64
                    if size > (1 << 20) or self._queue.empty():
                        break
                    cid, req = self._queue.get_nowait()
                for chunk in pieces(batch.SerializeToString()):
                    await call.write(chunk)

        async def reader() -> None:
            assembler = Assembler()
            try:
                while True:
                    chunk = await call.read()
                    if not isinstance(chunk, pb.StreamChunk):
                        raise ConnectionError("the coordinator closed the call stream")
                    data = assembler.feed(chunk)
                    if data is None:
                        continue
                    batch = pb.ReplyBatch.FromString(data)
                    for cid, reply in zip(batch.ids, batch.replies):
                        fut = self._pending.get(cid)
                        if fut is not None and not fut.done():
                            fut.set_result(reply)
            except (grpc.RpcError, ConnectionError) as exc:
                err = _unavailable(exc, self.target) if isinstance(exc, grpc.RpcError) else Unavailable(str(exc))
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(err)
            finally:
                w.cancel()

        w = asyncio.get_running_loop().create_task(writer())
        self._stream = asyncio.get_running_loop().create_task(reader())

    async def call(self, service: str, data: Any = None, *, timeout: float | None = None) -> Any:
        return (await self.envelope(service, data, timeout=timeout)).unwrap()

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def admin_credential(state_dir: str | os.PathLike[str]) -> str:
    p = Path(state_dir).expanduser() / "admin.token"
    try:
        return p.read_text().strip()
    except OSError:
        raise PermissionError(f"no admin credential at {p}: publishing needs the coordinator's state "
                              "directory (--state-dir or MICROSWARM_STATE_DIR)") from None


def publish(target: Any, *, coordinator: str | None = None, state_dir: str | os.PathLike[str] | None = None
            ) -> list[pb.PublishReply]:
    """Publish services: a MicroCore class, a module, or a path to a file or package."""
    from ._package import build, import_path, services_in
    from .core import MicroCore

    if state_dir is None:
        from_env = os.environ.get("MICROSWARM_STATE_DIR")
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        state_dir = from_env or os.path.join(base, "microswarm")
    if isinstance(target, type) and issubclass(target, MicroCore):
        classes = [target]
    elif isinstance(target, (str, os.PathLike)):
        classes = [c for m in import_path(Path(target)) for c in services_in(m)]
    else:
        classes = services_in(target)
    if not classes:
        raise ValueError(f"no MicroCore subclass with a name found in {target}")
    cred = admin_credential(state_dir)
    target_addr = coordinator or default_coordinator()
    replies = []
    with grpc.insecure_channel(target_addr, options=CHANNEL_OPTIONS) as channel:
        stub = pbg.CoordinatorStub(channel)
        for cls in classes:
            pkg = build(cls)
            try:
                replies.append(stub.Publish(pb.PublishRequest(manifest=pkg.manifest, archive=pkg.archive),
                                            metadata=[("authorization", f"Admin {cred}")], timeout=60))
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
                    raise from_code("publish_refused", f"{cls.name}: {exc.details()}") from None
                raise _unavailable(exc, target_addr) from None
    return replies
