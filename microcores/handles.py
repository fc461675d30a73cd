"""Handles of submitted calls: `Client.submit` returns a CallHandle, `AsyncClient.submit` an
AsyncCallHandle, like Ray's ObjectRef or a concurrent.futures.Future.

    h = client.submit("math.compute", {"a": 2, "b": 3, "op": "mul"})
    h.id                 # fetch it later, from any process of the same client: client.result(h.id)
    h.done()             # without waiting
    h.progress()         # (fraction, message): the last self.progress() of its service, without waiting
    h.result(timeout=30) # the result, or the MicroError the call ended in
    h.envelope()         # the whole answer
    h.cancel()           # stops its job wherever it runs; its envelope is then `cancelled`
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import grpc

from microswarm.protos import microswarm_pb2 as pb

from .errors import DeadlineExceeded, MicroError, from_code

if TYPE_CHECKING:
    from .client import AsyncClient, Client, Envelope

POLL_S = 30.0  # one Result request waits at most this long; a longer wait asks again


def rpc_error(exc: grpc.RpcError, target: str) -> MicroError:
    """A Submit/Result/Cancel failure as the MicroError it carries ("code: message")."""
    from .client import _unavailable
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else ""
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED) \
            and details and ": " in details:
        wire_code, _, message = details.partition(": ")
        return from_code(wire_code if code != grpc.StatusCode.UNAUTHENTICATED else "unauthenticated",
                         message if code != grpc.StatusCode.UNAUTHENTICATED else details)
    return _unavailable(exc, target)


def _left(deadline: float | None) -> float:
    return POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))


def _not_yet(call_id: str, timeout: float | None) -> DeadlineExceeded:
    return DeadlineExceeded(f"call {call_id} had not finished after {timeout:g} s (it goes on: fetch it later "
                            "with result(), or cancel it)")


def _progress_of(r: pb.ResultReply, last: tuple[float, str]) -> tuple[float, str]:
    if r.state == "pending":
        return float(r.progress), r.progress_message
    done = r.state == "done" and r.reply.status == "ok"
    return (1.0 if done else last[0]), (r.progress_message or last[1])


class CallHandle:
    def __init__(self, client: Client, call_id: str, service: str = "") -> None:
        self._client, self.id, self.service = client, call_id, service
        self._envelope: Envelope | None = None
        self._progress: tuple[float, str] = (0.0, "")

    def progress(self) -> tuple[float, str]:
        """(fraction 0..1, message): the last `self.progress()` its service reported (1.0 once it
        succeeded), asked of the coordinator without waiting."""
        if self._envelope is None:
            r = self._client._result_reply(self.id, 0.0)
            self._progress = _progress_of(r, self._progress)
            self._envelope = envelope_of(r)
        elif self._envelope.ok:
            self._progress = (1.0, self._progress[1])
        return self._progress

    def __repr__(self) -> str:
        return f"CallHandle({self.id!r}, service={self.service!r}, done={self._envelope is not None})"

    def done(self) -> bool:
        if self._envelope is None:
            self._envelope = self._client._fetch(self.id, 0.0)
        return self._envelope is not None

    def envelope(self, timeout: float | None = None) -> Envelope:
        """The call's envelope, waiting up to `timeout` seconds (None: as long as it takes)."""
        if self._envelope is None:
            self._envelope = self._client.result(self.id, timeout=timeout)
        return self._envelope

    def result(self, timeout: float | None = None) -> Any:
        return self.envelope(timeout).unwrap()

    def cancel(self) -> bool:
        """Stop the call; True if it was cancelled (False: it had already finished)."""
        self._envelope = self._client.cancel(self.id)
        return _cancelled(self._envelope)


class AsyncCallHandle:
    def __init__(self, client: AsyncClient, call_id: str, service: str = "") -> None:
        self._client, self.id, self.service = client, call_id, service
        self._envelope: Envelope | None = None
        self._progress: tuple[float, str] = (0.0, "")

    async def progress(self) -> tuple[float, str]:
        """(fraction 0..1, message): the last `self.progress()` its service reported (1.0 once it
        succeeded), asked of the coordinator without waiting."""
        if self._envelope is None:
            r = await self._client._result_reply(self.id, 0.0)
            self._progress = _progress_of(r, self._progress)
            self._envelope = envelope_of(r)
        elif self._envelope.ok:
            self._progress = (1.0, self._progress[1])
        return self._progress

    def __repr__(self) -> str:
        return f"AsyncCallHandle({self.id!r}, service={self.service!r}, done={self._envelope is not None})"

    async def done(self) -> bool:
        if self._envelope is None:
            self._envelope = await self._client._fetch(self.id, 0.0)
        return self._envelope is not None

    async def envelope(self, timeout: float | None = None) -> Envelope:
        if self._envelope is None:
            self._envelope = await self._client.result(self.id, timeout=timeout)
        return self._envelope

    async def result(self, timeout: float | None = None) -> Any:
        return (await self.envelope(timeout)).unwrap()

    async def cancel(self) -> bool:
        self._envelope = await self._client.cancel(self.id)
        return _cancelled(self._envelope)

    def __await__(self) -> Any:
        return self.result().__await__()


def _cancelled(env: Envelope | None) -> bool:
    """Whether a Cancel's answer says the call was stopped (not: it had already finished)."""
    return env is not None and not env.ok and (env.error or {}).get("code") == "cancelled"


def envelope_of(reply: pb.ResultReply) -> Envelope | None:
    """The envelope a Result/Cancel answer carries; None while the call is still running."""
    from .client import Envelope
    if reply.state == "pending":
        return None
    return Envelope.from_reply(reply.reply)


def wait_envelope(fetch: Any, call_id: str, timeout: float | None) -> Envelope:
    """Ask again until the call ends or `timeout` passes (sync)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        env = fetch(call_id, _left(deadline))
        if env is not None:
            return env  # type: ignore[no-any-return]
        if deadline is not None and time.monotonic() >= deadline:
            raise _not_yet(call_id, timeout)


async def wait_envelope_async(fetch: Any, call_id: str, timeout: float | None) -> Envelope:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        env = await fetch(call_id, _left(deadline))
        if env is not None:
            return env  # type: ignore[no-any-return]
        if deadline is not None and time.monotonic() >= deadline:
            raise _not_yet(call_id, timeout)
