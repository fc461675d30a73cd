"""The shared result region on Redis, behind each coordinator's near cache (issue 14, seed 000).

Several coordinators of one cluster answer the same pure calls; a result computed behind one of
them should be served by the others. Seed 000's strategies, as built here:

* **near cache**: each coordinator keeps its heap-governed LRU (cache.py, governor.py) in front;
  the governor still governs only it. Redis's memory is Redis's (maxmemory + volatile-lru: every
  entry carries a TTL, see docs/cache.md).
* **read-through**: near cache -> Redis -> run (SharedCacheDispatcher._run). A Redis hit is put in
  the near cache, so the next one is local.
* **write-through** (`--cache-write through`, the default): the entry is in Redis before the answer
  goes out (the call waits for the write, WRITE_WAIT_S at most).
* **write-behind** (`behind`): writes wait in a bounded queue and go in batches; a crash loses at
  most the queue, whose length is reported (status, /metrics, the log when it overflows).

Entries are stored as verify.seal made them (value + producers + verified), so a convicted agent's
results can be found: each write adds the entry's key to a per-producer index set, and a purge
(Coordinator.convict) deletes what that set names, records the agent in a `convicted` hash and
publishes its id; every coordinator purges its near cache on the message and re-reads the hash
when it reconnects (so a purge missed while Redis was away still lands), and no entry naming a
convicted agent is served from Redis or written to it (a guard for index sets Redis evicted).

When Redis is unreachable, calls keep being answered (near cache, then run): the first failure is
logged once, reads and through-writes are skipped, the write-behind queue keeps filling up to its
bound, and a reconnect loop with back-off brings it all back (and flushes the queue).
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .cache import ResultCache
from .cache_purge import Purges
from .verify import COORDINATOR, made_by, opened

log = logging.getLogger("microswarm.cache.shared")

WRITE_MODES = ("through", "behind")
DEFAULT_TTL_S = 86_400.0     # entries of services without cache_ttl: Redis needs a TTL to evict them (volatile-lru)
WRITE_WAIT_S = 1.0           # a through-write holds its call's answer this long at most
BACKOFF_S = (0.1, 5.0)       # reconnect: first wait, longest wait (doubling)
UNTRACKED = frozenset({COORDINATOR, "upstream", "cache", ""})   # producers that are never convicted

#: the through-writes of the call in this task (SharedCacheDispatcher waits for them before answering)
WRITES: contextvars.ContextVar[list[asyncio.Task[None]] | None] = contextvars.ContextVar("writes", default=None)


def redacted(url: str) -> str:
    """The URL without its password (for status and logs)."""
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class SharedRegion(Purges):
    """The Redis side: one client, its health, writes (through or behind), reads; purges (cache_purge.py)."""

    def __init__(self, url: str, *, write: str = "through", prefix: str = "microswarm", queue_limit: int = 10_000,
                 batch: int = 256, interval_s: float = 0.05, default_ttl_s: float = DEFAULT_TTL_S,
                 on_purge: Callable[[str], int] | None = None) -> None:
        if write not in WRITE_MODES:
            raise ValueError(f"--cache-write {write!r}: choose one of {', '.join(WRITE_MODES)}")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--cache-url {redacted(url)!r}: expected redis://HOST:PORT/DB (or rediss://, unix://)")
        if queue_limit < 1 or batch < 1 or interval_s <= 0:
            raise ValueError("--cache-write-queue and --cache-write-batch must be at least 1, "
                             "--cache-write-interval more than 0")
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url, self.write_mode, self.prefix = url, write, prefix
        self.queue_limit, self.batch, self.interval_s, self.default_ttl_s = queue_limit, batch, interval_s, default_ttl_s
        self.on_purge = on_purge or (lambda agent: 0)
        # fail fast: a call never waits on Redis's retries; the reconnect loop is ours
        self.client: Any = aioredis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5,
                                        retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.up = False
        self.convicted: set[str] = set()
        self.queue: deque[tuple[bytes, bytes, float | None]] = deque()
        self._wake = asyncio.Event()
        self._up_event = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._pending: set[asyncio.Task[None]] = set()
        self._down_since = 0.0
        self.origin = uuid.uuid4().hex[:12]  # this coordinator's purge messages: not purged again on receipt
        self._unpublished: set[str] = set()  # agents convicted while Redis was away: purged when it is back
        self.n = dict(hits=0, misses=0, errors=0, writes=0, write_skipped=0, write_dropped=0, purged=0, outages=0,
                      batches=0)

    def k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # ------------------------------------------------------------ health

    async def start(self) -> None:
        """Connect (without waiting for Redis: a coordinator starts and answers without it)."""
        self._tasks.append(asyncio.create_task(self._reconnect(first=True)))
        self._tasks.append(asyncio.create_task(self._subscriber()))
        if self.write_mode == "behind":
            self._tasks.append(asyncio.create_task(self._flusher()))

    def failed(self, exc: BaseException) -> None:
        """A Redis operation failed: log it once, stop using Redis, reconnect with back-off. An error
        Redis answered (full under noeviction, a wrong type) is counted and logged, not an outage."""
        from redis.exceptions import ResponseError

        self.n["errors"] += 1
        if isinstance(exc, ResponseError):
            if self.n["errors"] == 1 or self.n["errors"] % 1000 == 0:
                log.warning("Redis %s refused an operation (%d errors so far): %s", redacted(self.url),
                            self.n["errors"], exc, extra={"event": "redis_error"})
            return
        if not self.up:
            return
        self.up = False
        self._up_event.clear()
        self._down_since = time.monotonic()
        self.n["outages"] += 1
        log.warning("Redis %s unreachable (%s): calls are answered from the near cache or run; %s; "
                    "reconnecting with back-off", redacted(self.url), exc or type(exc).__name__,
                    f"write-behind queue holds {len(self.queue)} of {self.queue_limit}"
                    if self.write_mode == "behind" else "through-writes are skipped",
                    extra={"event": "redis_down"})
        self._tasks.append(asyncio.create_task(self._reconnect()))

    async def _reconnect(self, first: bool = False) -> None:
        wait = BACKOFF_S[0]
        while True:
            try:
                await self.client.ping()
                await self._resync()
            except Exception as exc:
                if first:
                    first = False
                    self.up = True  # so that failed() logs this once
                    self.failed(exc)
                    return
                await asyncio.sleep(wait)
                wait = min(wait * 2, BACKOFF_S[1])
                continue
            self.up = True
            self._up_event.set()
            for agent in sorted(self._unpublished):
                self._unpublished.discard(agent)
                self._tasks.append(asyncio.create_task(self.purge_producer(agent)))
            if self._down_since:
                log.warning("Redis %s reachable again after %.1f s", redacted(self.url),
                            time.monotonic() - self._down_since, extra={"event": "redis_up"})
            else:
                log.info("shared cache on Redis %s (--cache-write %s)", redacted(self.url), self.write_mode)
            self._wake.set()
            return

    async def stop(self) -> None:
        """Flush what write-behind holds (a graceful stop loses nothing), then close."""
        if self.queue and self.up:
            n = len(self.queue)
            try:
                while self.queue:
                    await self._flush_batch()
                log.info("write-behind: %d queued entr%s written to Redis before stopping", n, "y" if n == 1 else "ies")
            except Exception as exc:  # noqa: BLE001
                log.warning("write-behind: %d entries not written to Redis before stopping: %s", len(self.queue), exc)
        elif self.queue:
            log.warning("write-behind: %d entries not written to Redis before stopping: it is unreachable",
                        len(self.queue), extra={"event": "write_lost"})
        for t in self._tasks:
            t.cancel()
        if self._pending:
            await asyncio.wait(self._pending, timeout=WRITE_WAIT_S)
        await self.client.aclose()

    # ------------------------------------------------------------ reads

    async def get(self, key: bytes) -> bytes | None:
        """The sealed value in Redis, or None (a miss, Redis away, or made by a convicted agent)."""
        if not self.up:
            return None
        try:
            stored: bytes | None = await self.client.get(self.k("r", key.hex()))
        except Exception as exc:
            self.failed(exc)
            return None
        if stored is None:
            self.n["misses"] += 1
            return None
        if self.convicted and self.convicted.intersection(opened(stored)[1]):
            self.n["misses"] += 1
            asyncio.create_task(self._delete(key))
            return None
        self.n["hits"] += 1
        return stored

    async def _delete(self, key: bytes) -> None:
        try:
            await self.client.delete(self.k("r", key.hex()))
        except Exception as exc:
            self.failed(exc)

    # ------------------------------------------------------------ writes

    def write(self, key: bytes, stored: bytes, ttl_s: float | None) -> None:
        """Send an entry to Redis: at once (through; the call's answer waits for it) or queued (behind)."""
        producers = opened(stored)[1]
        if self.convicted and self.convicted.intersection(producers):
            return
        if self.write_mode == "behind":
            if len(self.queue) >= self.queue_limit:
                self.queue.popleft()
                self.n["write_dropped"] += 1
                if self.n["write_dropped"] == 1 or self.n["write_dropped"] % 1000 == 0:
                    log.warning("write-behind queue full (%d): %d entries dropped so far (not in Redis)",
                                self.queue_limit, self.n["write_dropped"], extra={"event": "write_dropped"})
            self.queue.append((key, stored, ttl_s))
            if len(self.queue) >= self.batch:
                self._wake.set()
            return
        if not self.up:
            self.n["write_skipped"] += 1
            return
        try:
            task = asyncio.get_running_loop().create_task(self._write_one(key, stored, ttl_s))
        except RuntimeError:  # not on the event loop: nothing to write with
            self.n["write_skipped"] += 1
            return
        self._pending.add(task)  # held until done (a call stops waiting after WRITE_WAIT_S), and awaited on stop
        task.add_done_callback(self._pending.discard)
        waiting = WRITES.get()
        if waiting is not None:  # the call's answer waits for it (SharedCacheDispatcher)
            waiting.append(task)

    def _add(self, pipe: Any, key: bytes, stored: bytes, ttl_s: float | None) -> None:
        ttl = max(1, int(ttl_s if ttl_s is not None and ttl_s > 0 else self.default_ttl_s))
        hexkey = key.hex()
        pipe.set(self.k("r", hexkey), stored, ex=ttl)
        for p in opened(stored)[1]:
            if p in UNTRACKED:
                continue
            idx = self.k("by", p)
            pipe.sadd(idx, hexkey)
            pipe.expire(idx, ttl, nx=True)  # a new set gets the entry's TTL...
            pipe.expire(idx, ttl, gt=True)  # ...and keeps the longest of its entries'

    async def _write_one(self, key: bytes, stored: bytes, ttl_s: float | None) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                self._add(pipe, key, stored, ttl_s)
                await pipe.execute()
            self.n["writes"] += 1
        except Exception as exc:
            self.n["write_skipped"] += 1
            self.failed(exc)

    async def _flusher(self) -> None:
        """Write-behind: full batches as soon as the queue holds `batch`; whatever waits, every `interval_s`."""
        while True:
            full_only = True
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                full_only = False
            self._wake.clear()
            while self.queue and self.up and (len(self.queue) >= self.batch or not full_only):
                try:
                    await self._flush_batch()
                except Exception as exc:
                    self.failed(exc)
                    break

    async def _flush_batch(self) -> None:
        batch = [self.queue[i] for i in range(min(self.batch, len(self.queue)))]
        async with self.client.pipeline(transaction=False) as pipe:
            for key, stored, ttl in batch:
                self._add(pipe, key, stored, ttl)
            await pipe.execute()
        for _ in batch:  # only once written: a crash before this loses at most the queue
            if self.queue:
                self.queue.popleft()
        self.n["writes"] += len(batch)
        self.n["batches"] += 1

    # ------------------------------------------------------------ figures

    def stats(self) -> dict[str, Any]:
        n = self.n
        return {"shared_url": redacted(self.url), "shared_up": self.up, "shared_write": self.write_mode,
                "shared_hits": n["hits"], "shared_misses": n["misses"], "shared_errors": n["errors"],
                "shared_outages": n["outages"], "shared_writes": n["writes"], "shared_write_skipped": n["write_skipped"],
                "shared_purged": n["purged"], "write_queue": len(self.queue), "write_queue_limit": self.queue_limit,
                "write_dropped": n["write_dropped"], "write_batches": n["batches"]}


class NearCache(ResultCache):
    """The heap-governed LRU (a ResultCache, governed as before) that also hands its writes to Redis."""

    def __init__(self, shared: SharedRegion | None = None) -> None:
        super().__init__()
        self.shared = shared

    def put(self, key: bytes, value: bytes, ttl_s: float | None = None) -> bool:
        ok = super().put(key, value, ttl_s)
        if self.shared is not None and (ttl_s is None or ttl_s > 0):
            self.shared.write(key, value, ttl_s)   # whether or not the near cache admitted it
        return ok

    def keep(self, key: bytes, value: bytes, ttl_s: float | None = None) -> bool:
        """Store in the near cache only (an entry read from Redis)."""
        return super().put(key, value, ttl_s)

    async def read_through(self, key: bytes, ttl_s: float | None = None) -> bytes | None:
        """After a near miss: the entry from Redis (then kept near), or None."""
        if self.shared is None or not self.shared.up:
            return None
        stored = await self.shared.get(key)
        if stored is not None:
            self.keep(key, stored, ttl_s)
        return stored

    def purge_producer(self, agent: str) -> int:
        return self.purge(made_by(agent))[0]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(super().stats())
        if self.shared is not None:
            out.update(self.shared.stats())
        return out
