"""Before an agent has proven anything: how many handshakes are read at once, from one host and in
all, how often a host may start one, and how large a handshake frame may be.

gRPC assembles a whole message (up to the server-wide limit, needed by clients' calls) before the
handler sees it, so the bound on unauthenticated memory is the number of handshakes past their
first read: a slot is taken before that read (with BDP probing off, see server.py, gRPC does not
take a message off the wire until the handler asks for it). Figures: docs/design.md, "Link limits".
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator

from microswarm.protos import microswarm_pb2 as pb

from .handshake import Refused
from .ratelimit import Bucket

# Before the handshake. A hello is a few hundred bytes; the server-wide gRPC limit (80 MiB, for
# clients' calls) is no bound here: the number of handshakes reading at once is.
HANDSHAKE_S = 5.0              # dial to proof; was 10 s (a handshake is 1.5 round trips)
HELLO_MAX = 64 * 1024          # bytes of one handshake frame
PREAUTH_TOTAL = 2              # handshakes past their first read at once, all hosts together
PREAUTH_PER_HOST = 1           # ...from one host
PREAUTH_QUEUE_PER_HOST = 64    # one host's handshakes waiting for a slot (unread: ~64 KiB each); more: `busy`
PREAUTH_RATE = (10.0, 40.0)    # handshakes a host may start per second, burst (each costs signatures)

class Busy(Exception):
    pass


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`), for per-host limits."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")]
    return rest.rpartition(":")[0] or rest


class PreAuthGate:
    """Bounds unauthenticated handshakes in number (and so in memory): a slot is taken before the
    first read, per host and in all, waited for at most `wait_s`."""

    def __init__(self, total: int = PREAUTH_TOTAL, per_host: int = PREAUTH_PER_HOST,
                 queue_per_host: int = PREAUTH_QUEUE_PER_HOST, wait_s: float = HANDSHAKE_S,
                 rate: float = PREAUTH_RATE[0]) -> None:
        self.total, self.per_host, self.queue_per_host, self.wait_s = total, per_host, queue_per_host, wait_s
        self.rate = (rate, rate * PREAUTH_RATE[1] / PREAUTH_RATE[0])  # per second, burst
        self._all: asyncio.Semaphore | None = None
        self._hosts: dict[str, tuple[asyncio.Semaphore, int]] = {}  # host -> (its slots, handshakes there)
        self._rates: dict[str, Bucket] = {}  # host -> handshakes it may start
        self.refused = 0

    @contextlib.asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        if self._all is None:
            self._all = asyncio.Semaphore(self.total)
        now = time.monotonic()
        rate = self._rates.get(host)
        if rate is None:
            if len(self._rates) >= 4096:  # forget hosts that have been quiet (their buckets are full again)
                self._rates = {h: b for h, b in self._rates.items() if b.take(now, 0.0) and b.tokens < b.burst}
                if len(self._rates) >= 4096:  # that many hosts at once: the global bound is what is left
                    self._rates.clear()
            rate = self._rates[host] = Bucket(*self.rate, stamp=now)
        if not rate.take(now):
            self.refused += 1
            raise Busy(f"more than {self.rate[0]:g} handshakes a second from {host}; retry later")
        sem, n = self._hosts.get(host, (None, 0))
        if n >= self.per_host + self.queue_per_host:
            self.refused += 1
            raise Busy(f"{n} handshakes from {host} are already under way; retry later")
        if sem is None:
            sem = asyncio.Semaphore(self.per_host)
        self._hosts[host] = (sem, n + 1)
        try:
            try:
                async with asyncio.timeout(self.wait_s):
                    await sem.acquire()
                    try:
                        await self._all.acquire()
                    except BaseException:
                        sem.release()
                        raise
            except TimeoutError:
                self.refused += 1
                raise Busy(f"the coordinator is busy with other handshakes (waited {self.wait_s:g} s)") from None
            try:
                yield
            finally:
                self._all.release()
                sem.release()
        finally:
            sem2, n2 = self._hosts[host]
            if n2 <= 1:
                del self._hosts[host]
            else:
                self._hosts[host] = (sem2, n2 - 1)


class Handshaking:
    """The stream as handshake.py sees it: each frame it reads is at most HELLO_MAX bytes."""

    def __init__(self, context: Any) -> None:
        self._context = context

    async def read(self) -> Any:
        frame = await self._context.read()
        size = frame.ByteSize() if isinstance(frame, pb.LinkFrame) else 0
        if size > HELLO_MAX:
            del frame  # not kept alive by the refusal's traceback
            raise Refused("too_large", f"a handshake frame of {size} bytes; the limit is {HELLO_MAX}")
        return frame

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
