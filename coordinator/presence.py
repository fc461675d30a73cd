"""Coordinators' presence on Redis: `status` on any coordinator of a cluster shows all of them.

Each coordinator writes a small JSON record under `PREFIX:coordinator:ID` with a TTL (TTL_S) and
adds its id to the set `PREFIX:coordinators`, every INTERVAL_S; in the same round trip it reads
the set and the others' records. A record that is gone (its coordinator stopped refreshing it: a
SIGKILL, a partition) is taken out of the set by whoever finds it missing. Status is synchronous
(the Status RPC builds its reply without awaiting), so it reads the snapshot of the last round,
and drops any record whose own `seen` time is older than its TTL: a dead coordinator leaves every
status within its TTL, however late the snapshot. A graceful stop deletes its record at once.

The id is HOST/LISTEN: coordinators of one cluster share one identity (one key fingerprint), so
the fingerprint cannot tell them apart.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from .cache_shared import SharedRegion

log = logging.getLogger("microswarm.presence")

TTL_S = 3.0
INTERVAL_S = 1.0
FIELDS = ("id", "listen", "http", "fingerprint", "agents", "slots", "running", "calls_per_s", "uptime_s")


def instance_id(listen: str) -> str:
    return f"{socket.gethostname()}/{listen}"


class Presence:
    """This coordinator's record in Redis, refreshed; the cluster's records, as last read."""

    def __init__(self, region: SharedRegion, ident: str, describe: Callable[[], dict[str, Any]],
                 ttl_s: float = TTL_S, interval_s: float = INTERVAL_S) -> None:
        self.region = region
        self.id = ident
        self.describe = describe  # this coordinator's figures now (without calls_per_s: measured here)
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.peers: dict[str, dict[str, Any]] = {}
        self._calls: tuple[float, int] | None = None  # (when, calls_total) at the last round
        self.calls_per_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def _mine(self) -> dict[str, Any]:
        me = dict(self.describe())
        now = time.monotonic()
        total = int(me.pop("calls_total", 0))
        if self._calls is not None and now > self._calls[0]:
            self.calls_per_s = max(0.0, (total - self._calls[1]) / (now - self._calls[0]))
        self._calls = (now, total)
        me.update(id=self.id, calls_per_s=round(self.calls_per_s, 2), seen=time.time(), ttl_s=self.ttl_s)
        return me

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        r = self.region
        while True:
            if r.up:
                try:
                    await self.refresh()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    r.failed(exc)
            else:
                self._mine()  # keep the calls/s window current
            await asyncio.sleep(self.interval_s)

    async def refresh(self) -> None:
        r = self.region
        me = self._mine()
        members = r.k("coordinators")
        async with r.client.pipeline(transaction=False) as pipe:
            pipe.set(r.k("coordinator", self.id), json.dumps(me), px=int(self.ttl_s * 1000))
            pipe.sadd(members, self.id)
            pipe.smembers(members)
            ids = sorted(m.decode() for m in (await pipe.execute())[2])
        records = await r.client.mget([r.k("coordinator", i) for i in ids]) if ids else []
        peers: dict[str, dict[str, Any]] = {}
        gone = []
        for ident, raw in zip(ids, records):
            if raw is None:
                gone.append(ident)
                continue
            try:
                peers[ident] = json.loads(raw)
            except ValueError:
                continue
        if gone:
            await r.client.srem(members, *gone)
        self.peers = peers

    def view(self) -> list[dict[str, Any]]:
        """Every live coordinator (this one first, always fresh), with `seen_s` and `here`."""
        now = time.time()
        me = self._mine() if self._calls is None else {**self.describe(), "id": self.id,
                                                       "calls_per_s": round(self.calls_per_s, 2)}
        me.pop("calls_total", None)
        out = [{**me, "seen_s": 0.0, "here": True}]
        for ident, rec in sorted(self.peers.items()):
            if ident == self.id:
                continue
            age = now - float(rec.get("seen", 0))
            if age <= float(rec.get("ttl_s", self.ttl_s)):
                out.append({**rec, "seen_s": round(max(0.0, age), 3), "here": False})
        return out

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        r = self.region
        if r.up:
            try:
                async with r.client.pipeline(transaction=False) as pipe:
                    pipe.delete(r.k("coordinator", self.id))
                    pipe.srem(r.k("coordinators"), self.id)
                    await pipe.execute()
            except Exception as exc:  # noqa: BLE001 - stopping anyway; the TTL removes it
                log.info("presence record not removed (%s); it expires in %g s", exc, self.ttl_s)
