"""Purges of a convicted agent's results across the cluster: Redis, and every coordinator's near cache.

Part of the shared region (cache_shared.SharedRegion inherits it). Every write adds the entry's key
to the producer's index set (`PREFIX:by:AGENT`), so a conviction (Coordinator.convict) can find and
delete them in Redis; the agent goes into the `PREFIX:convicted` hash and its id out on the
`PREFIX:purge` channel. Every coordinator purges its near cache on the message, and re-reads the
hash whenever it (re)connects: a message published while it could not hear it is not lost. A
conviction while Redis is away is kept and carried out when it is back.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("microswarm.cache.shared")


class Purges:
    """The purge half of SharedRegion (which sets these attributes)."""

    client: Any
    up: bool
    origin: str
    convicted: set[str]
    on_purge: Callable[[str], int]
    n: dict[str, int]
    _up_event: asyncio.Event
    _unpublished: set[str]

    def k(self, *parts: str) -> str:
        raise NotImplementedError

    def failed(self, exc: BaseException) -> None:
        raise NotImplementedError

    async def _resync(self) -> None:
        """Purges published while this coordinator could not hear them: the convicted hash."""
        held = await self.client.hgetall(self.k("convicted"))
        for agent in {a.decode() for a in held} - self.convicted:
            self.convicted.add(agent)
            self.on_purge(agent)

    async def _subscriber(self) -> None:
        """Purges by other coordinators (pub/sub): purge this near cache too."""
        while True:
            await self._up_event.wait()
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.k("purge"))
                await self._resync()  # one published between the resync and the subscription
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        origin, _, agent = msg["data"].decode().partition("\n")
                        self.convicted.add(agent)
                        if origin == self.origin:
                            continue
                        n = self.on_purge(agent)
                        log.info("purge of agent %s's results from another coordinator: %d near cache entr%s",
                                 agent, n, "y" if n == 1 else "ies", extra={"agent": agent, "event": "purge"})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failed(exc)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001 - already broken
                    pass

    async def purge_producer(self, agent: str) -> int:
        """Delete every entry `agent` helped compute, everywhere: Redis, and (pub/sub) every near cache."""
        self.convicted.add(agent)  # this coordinator neither serves nor writes its entries from now on
        if not self.up:
            self._unpublished.add(agent)
            return 0
        try:
            await self.client.hset(self.k("convicted"), agent, str(time.time()))
            idx = self.k("by", agent)
            members = [m.decode() for m in await self.client.smembers(idx)]
            gone = 0
            for i in range(0, len(members), 500):
                gone += int(await self.client.delete(*(self.k("r", m) for m in members[i:i + 500])))
            await self.client.delete(idx)
            await self.client.publish(self.k("purge"), f"{self.origin}\n{agent}")
        except Exception as exc:
            self._unpublished.add(agent)
            self.failed(exc)
            return 0
        self.n["purged"] += gone
        return gone
