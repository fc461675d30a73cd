"""The coordinator's read-through result cache: an LRU of encoded results, accounted in bytes.

A pure data structure; the heap governor (``coordinator.governor``) decides when to evict from it
and when it stops admitting. Everything here is thread-safe: one lock guards the table and the
counters, and evicted values are released after the lock is dropped so that freeing memory never
lengthens a critical section.

Keys come from :func:`cache_key`: a BLAKE2b-256 digest of the package digest, the service name and
the canonical encoding of the validated input, each length-prefixed. A new package version has a
new digest, hence new keys: it can never be answered with an older version's result.

Each entry is accounted as ``len(key) + len(value) + ENTRY_OVERHEAD`` bytes (plus
``TTL_OVERHEAD`` when it has a time-to-live). The overheads were measured on CPython 3.11 /
x86-64 / glibc 2.36 as the growth of a fresh process's RSS while filling 100,000 to 300,000
entries, minus the key and value lengths: 177-218 bytes per entry (the spread is where the
OrderedDict's tables are in their doubling cycle; value sizes 100 to 10,000 bytes alike), and
67-84 bytes more with a TTL. They cover the bytes-object headers of key and value, glibc's chunk
header and rounding, the OrderedDict slot, its linked-list node and its share of the index tables.
``tests/test_cache.py`` re-checks them against ``tracemalloc``. They make ``accounted_bytes`` a
close estimate of the memory the cache really holds, which is what the governor needs to tell
live data from garbage.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

# Measured per-entry overheads in bytes (see module docstring).
ENTRY_OVERHEAD = 200
TTL_OVERHEAD = 80

_PERSON = b"microswarm-cache"  # BLAKE2b personalisation: 16 bytes, separates this use of the hash


def cache_key(digest: str, service: str, canonical_input: bytes) -> bytes:
    """The cache key of one call: 32 bytes, different whenever any of the three parts differs."""
    h = hashlib.blake2b(digest_size=32, person=_PERSON)
    for part in (digest.encode(), service.encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    h.update(len(canonical_input).to_bytes(8, "big"))
    h.update(canonical_input)
    return h.digest()


class ResultCache:
    """Thread-safe LRU of ``bytes -> bytes`` with byte accounting and optional per-entry TTL.

    ``admitting`` is flipped by the heap governor: while it is False (memory above the critical
    threshold) :meth:`put` refuses new entries, and :meth:`get` keeps answering.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._acquire = self._lock.acquire
        self._release = self._lock.release
        self._data: OrderedDict[bytes, bytes] = OrderedDict()   # LRU first, MRU last
        self._expires: dict[bytes, float] = {}                  # only for entries with a TTL
        self._clock = clock
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._evicted_bytes = 0
        self._expired = 0
        self._refusals = 0
        self._purged = 0
        self.admitting = True

    # ------------------------------------------------------------------ reads

    def get(self, key: bytes) -> bytes | None:
        """The cached value, or None (a miss). A hit becomes the most recently used entry."""
        self._acquire()           # explicit acquire/release: measurably cheaper than ``with``
        try:
            value = self._data.get(key)
            if value is None:
                self._misses += 1
                return None
            if self._expires:
                exp = self._expires.get(key)
                if exp is not None and exp <= self._clock():
                    del self._data[key]
                    del self._expires[key]
                    self._bytes -= len(key) + len(value) + ENTRY_OVERHEAD + TTL_OVERHEAD
                    self._expired += 1
                    self._misses += 1
                    return None
            self._data.move_to_end(key)
            self._hits += 1
            return value
        finally:
            self._release()

    def __contains__(self, key: bytes) -> bool:
        """Membership without touching LRU order or the hit/miss counters (expired entries count)."""
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    # ------------------------------------------------------------------ writes

    def put(self, key: bytes, value: bytes, ttl_s: float | None = None) -> bool:
        """Store or replace ``key``; it becomes the most recently used entry.

        Returns False, storing nothing, when the governor has stopped admission (critical
        memory). ``ttl_s`` None means no expiry; a ``ttl_s`` of zero or less means the value
        expires at once: nothing is stored (any older entry for the key is dropped) and True is
        returned, since that is not a refusal.
        """
        if value.__class__ is not bytes:
            value = bytes(value)          # never keep a caller's mutable buffer
        self._acquire()
        try:
            if not self.admitting:
                self._refusals += 1
                return False
            data = self._data
            old = data.get(key)
            if old is None:
                data[key] = value
                size = len(key) + len(value) + ENTRY_OVERHEAD
            else:
                data[key] = value
                data.move_to_end(key)
                size = len(value) - len(old)
                if self._expires and self._expires.pop(key, None) is not None:
                    size -= TTL_OVERHEAD
            if ttl_s is not None:
                if ttl_s <= 0:
                    del data[key]
                    self._bytes += size - len(key) - len(value) - ENTRY_OVERHEAD
                    return True
                self._expires[key] = self._clock() + ttl_s
                size += TTL_OVERHEAD
            self._bytes += size
            return True
        finally:
            self._release()

    def evict_lru(self, nbytes: int) -> tuple[int, int]:
        """Evict least-recently-used entries until at least ``nbytes`` accounted bytes are freed
        (or the cache is empty). Returns ``(entries, bytes)`` evicted."""
        if nbytes <= 0:
            return 0, 0
        victims: list[bytes] = []
        freed = 0
        with self._lock:
            data, expires = self._data, self._expires
            while freed < nbytes and data:
                key, value = data.popitem(last=False)
                size = len(key) + len(value) + ENTRY_OVERHEAD
                if expires and expires.pop(key, None) is not None:
                    size += TTL_OVERHEAD
                freed += size
                victims.append(value)
            self._bytes -= freed
            self._evictions += len(victims)
            self._evicted_bytes += freed
        n = len(victims)
        del victims                       # the values are freed here, outside the lock
        return n, freed

    def purge_expired(self) -> tuple[int, int]:
        """Drop every expired entry now (the governor calls this before evicting live ones).
        Returns ``(entries, bytes)`` dropped; they count as expirations, not evictions."""
        victims: list[bytes] = []
        freed = 0
        with self._lock:
            if not self._expires:
                return 0, 0
            now = self._clock()
            for key in [k for k, exp in self._expires.items() if exp <= now]:
                value = self._data.pop(key)
                del self._expires[key]
                freed += len(key) + len(value) + ENTRY_OVERHEAD + TTL_OVERHEAD
                victims.append(value)
            self._bytes -= freed
            self._expired += len(victims)
        n = len(victims)
        del victims
        return n, freed

    def purge(self, doomed: Callable[[bytes], bool]) -> tuple[int, int]:
        """Drop every entry whose stored value `doomed` picks (result verification purges what a
        lying agent computed: see coordinator.verify). A scan, under the lock: it is rare.
        Returns ``(entries, bytes)`` dropped; they count as neither evictions nor expirations."""
        victims: list[bytes] = []
        freed = 0
        with self._lock:
            for key in [k for k, v in self._data.items() if doomed(v)]:
                value = self._data.pop(key)
                freed += len(key) + len(value) + ENTRY_OVERHEAD
                if self._expires and self._expires.pop(key, None) is not None:
                    freed += TTL_OVERHEAD
                victims.append(value)
            self._bytes -= freed
            self._purged += len(victims)
        n = len(victims)
        del victims
        return n, freed

    def clear(self) -> None:
        """Drop every entry. Counters are kept (they describe the cache's whole life)."""
        with self._lock:
            old = self._data
            self._data = OrderedDict()
            self._expires = {}
            self._bytes = 0
        del old

    # ------------------------------------------------------------------ figures

    @property
    def entries(self) -> int:
        return len(self._data)

    @property
    def accounted_bytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            hits, misses = self._hits, self._misses
            return {
                "hits": hits,
                "misses": misses,
                "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
                "entries": len(self._data),
                "accounted_bytes": self._bytes,
                "evictions": self._evictions,
                "evicted_bytes": self._evicted_bytes,
                "expired": self._expired,
                "refusals": self._refusals,
                "purged": self._purged,
                "admitting": bool(self.admitting),
            }
