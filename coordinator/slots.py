"""Slots: the FIFO queue for volunteers' job slots, and the coordinator's own bounded slots.

A call whose package holders are all busy waits here instead of running on the coordinator:
volunteers do the work. The queue is one FIFO across services, but a waiter never blocks one
behind it that wants another package (each is matched against its own holders). A slot is
reserved for the waiter the moment it is handed over, so two calls never race for one slot.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from microcores.errors import Overloaded

from .observed import percentiles


class Holder(Protocol):
    agent_id: str
    reserved: int

    @property
    def free(self) -> int: ...


@dataclass(eq=False)
class Waiter:
    digest: str
    excluded: frozenset[str]
    future: asyncio.Future[Holder | None]
    since: float = field(default_factory=time.monotonic)
    queued: bool = True


Candidates = Callable[[str, frozenset[str]], list[Holder]]
Pick = Callable[[list[Holder]], Holder]


class SlotQueue:
    def __init__(self, limit: int, candidates: Candidates, pick: Pick) -> None:
        self.limit = limit
        self.candidates = candidates
        self.pick = pick
        self.waiters: deque[Waiter] = deque()  # oldest first; served or expired ones are dropped lazily
        self.queued = 0  # waiters still in line
        self.kinds: dict[tuple[str, frozenset[str]], int] = {}  # (digest, excluded) -> waiters for it
        self.waits: deque[float] = deque(maxlen=512)  # seconds waited by recent calls that queued
        self.overloaded = 0
        self.on_wait: Callable[[float], None] | None = None  # the metrics' histogram

    def __len__(self) -> int:
        return self.queued

    def take(self, digest: str, excluded: frozenset[str]) -> Holder | None:
        """A free holder now, with its slot reserved, or None. Queued calls come first."""
        if self.waiting_for(digest):
            return None  # FIFO: earlier calls for this package are still waiting
        cands = self.candidates(digest, excluded)
        if not cands:
            return None
        agent = self.pick(cands)
        agent.reserved += 1
        return agent

    def waiting_for(self, digest: str) -> bool:
        """Calls for this package wait in line (after handing out what is free)."""
        if not self.queued:
            return False
        self.pump()
        return any(d == digest for d, _ in self.kinds)

    async def wait(self, digest: str, excluded: frozenset[str], timeout: float) -> Holder | None:
        """Wait in line for a holder's slot (reserved on return); None when `timeout` passes."""
        if self.queued >= self.limit:
            self.overloaded += 1
            raise Overloaded(f"{self.queued} calls are already waiting for an agent slot (--queue-limit "
                             f"{self.limit}): retry later, or add agents")
        loop = asyncio.get_running_loop()
        w = Waiter(digest, excluded, loop.create_future())
        self.waiters.append(w)
        self.queued += 1
        key = (digest, excluded)
        self.kinds[key] = self.kinds.get(key, 0) + 1
        # A timer that resolves the waiter with None, rather than wait_for(shield()): two fewer
        # tasks per queued call, and no race between the timeout and a slot handed over.
        timer = loop.call_later(max(0.0, timeout), _expire, w.future)
        try:
            return await w.future
        except asyncio.CancelledError:
            holder = w.future.result() if w.future.done() and not w.future.cancelled() else None
            if holder is not None:
                holder.reserved -= 1  # handed a slot as we were cancelled: give it back
                self.pump()
            raise
        finally:
            timer.cancel()
            if w.queued:
                self._unqueue(w)
                self._compact()
            waited = time.monotonic() - w.since
            self.waits.append(waited)
            if self.on_wait is not None:
                self.on_wait(waited)

    def _unqueue(self, w: Waiter) -> None:
        w.queued = False
        self.queued -= 1
        key = (w.digest, w.excluded)
        n = self.kinds[key] - 1
        if n:
            self.kinds[key] = n
        else:
            del self.kinds[key]

    def _compact(self) -> None:
        """Drop the waiters no longer in line (they leave the deque lazily, not by an O(n) remove)."""
        waiters = self.waiters
        while waiters and not waiters[0].queued:
            waiters.popleft()
        if len(waiters) > 2 * self.queued + 32:
            self.waiters = deque(w for w in waiters if w.queued)

    def pump(self) -> None:
        """Hand free slots to waiters, oldest first. Called whenever a slot may have freed up.
        One look at the agents per kind of waiter, not per waiter, and the scan stops as soon as
        no kind of waiter in line can be served: the queue may be long and slots free one by one."""
        if not self.queued:
            self.waiters.clear()
            return
        free: dict[tuple[str, frozenset[str]], list[Holder]] = {}
        blocked: set[tuple[str, frozenset[str]]] = set()  # kinds no agent has a slot for
        for w in self.waiters:
            if not w.queued:
                continue
            if w.future.done():
                self._unqueue(w)
                continue
            key = (w.digest, w.excluded)
            if key in blocked:
                continue
            cands = free.get(key)
            if cands is None:
                cands = free[key] = self.candidates(w.digest, w.excluded)
            if not cands:
                blocked.add(key)
                if len(blocked) >= len(self.kinds):
                    break
                continue
            agent = self.pick(cands)
            agent.reserved += 1
            free.clear()  # that slot is gone for every kind of waiter its agent serves
            self._unqueue(w)
            w.future.set_result(agent)
        self._compact()

    def wake_unservable(self, servable: Callable[[str], bool]) -> None:
        """Waiters whose package no connected agent holds any more stop waiting (they get None)."""
        for w in list(self.waiters):
            if w.queued and not w.future.done() and not servable(w.digest):
                w.future.set_result(None)

    def wait_percentiles(self) -> tuple[float, float]:
        p50, p99 = percentiles(self.waits, 0.5, 0.99)
        return p50, p99


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


class LocalSlots:
    """The coordinator's own slots (`--local-slots`); waiting for one counts against the deadline."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def free(self) -> int:
        return self.n - self.used

    def try_take(self) -> bool:
        if self.used < self.n and not self._waiters:
            self.used += 1
            return True
        return False

    async def take(self, timeout: float) -> bool:
        """True with a slot held (release() it), False when `timeout` passes first."""
        if self.try_take():
            return True
        if self.n <= 0:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), max(0.0, timeout))
            return True
        except asyncio.TimeoutError:
            return fut.done() and not fut.cancelled()  # passed a slot just as the time ran out
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            raise
        finally:
            if not fut.done():
                fut.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next in line
                return
        self.used -= 1
