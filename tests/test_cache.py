"""The result cache: keys, LRU order, byte accounting, TTL, admission, thread safety."""
from __future__ import annotations

import gc
import threading
import time
import tracemalloc

import pytest

from microswarm.coordinator.cache import ENTRY_OVERHEAD, TTL_OVERHEAD, ResultCache, cache_key

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def size_of(key: bytes, value: bytes, ttl: bool = False) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD + (TTL_OVERHEAD if ttl else 0)


def recount(c: ResultCache) -> int:
    """Accounted bytes recomputed from the table itself."""
    return sum(size_of(k, v, k in c._expires) for k, v in c._data.items())


def order(c: ResultCache) -> list[bytes]:
    return list(c._data)


# ------------------------------------------------------------------ keys

def test_cache_key_is_stable_and_separates_every_part() -> None:
    k = cache_key("sha256:aa", "math.compute", b"\x81\xa1a\x01")
    assert isinstance(k, bytes) and len(k) == 32
    assert k == cache_key("sha256:aa", "math.compute", b"\x81\xa1a\x01")
    others = {
        cache_key("sha256:bb", "math.compute", b"\x81\xa1a\x01"),   # new package version
        cache_key("sha256:aa", "math.other", b"\x81\xa1a\x01"),     # other service
        cache_key("sha256:aa", "math.compute", b"\x81\xa1a\x02"),   # other input
    }
    assert k not in others and len(others) == 3
    # Length prefixes: moving bytes between fields changes the key.
    assert cache_key("ab", "c", b"") != cache_key("a", "bc", b"")
    assert cache_key("a", "b", b"c") != cache_key("a", "bc", b"")


def test_a_version_bump_misses_and_the_old_version_still_hits() -> None:
    c = ResultCache()
    inp = b"canonical-input"
    v1 = cache_key("sha256:v1", "svc", inp)
    c.put(v1, b"result from v1")
    assert c.get(cache_key("sha256:v2", "svc", inp)) is None
    assert c.get(v1) == b"result from v1"
    st = c.stats()
    assert (st["hits"], st["misses"]) == (1, 1)


# ------------------------------------------------------------------ LRU and accounting

def test_lru_order_follows_puts_and_gets() -> None:
    c = ResultCache()
    for k in (b"a", b"b", b"c", b"d"):
        c.put(k, k * 10)
    assert order(c) == [b"a", b"b", b"c", b"d"]
    assert c.get(b"a") == b"a" * 10            # a hit refreshes
    assert order(c) == [b"b", b"c", b"d", b"a"]
    assert c.put(b"c", b"new")                  # a replacement refreshes
    assert order(c) == [b"b", b"d", b"a", b"c"]
    assert c.get(b"zz") is None                 # a miss changes nothing
    assert b"b" in c and len(c) == 4            # membership does not refresh
    assert order(c) == [b"b", b"d", b"a", b"c"]

    n, freed = c.evict_lru(1)                   # one byte needs one whole entry: the LRU one
    assert (n, freed) == (1, size_of(b"b", b"b" * 10))
    assert order(c) == [b"d", b"a", b"c"]
    n, freed = c.evict_lru(size_of(b"d", b"d" * 10) + 1)   # just over one entry: two go
    assert n == 2 and freed == size_of(b"d", b"d" * 10) + size_of(b"a", b"a" * 10)
    assert order(c) == [b"c"]
    assert c.get(b"d") is None and c.get(b"c") == b"new"


def test_accounting_tracks_puts_replacements_evictions_and_clear() -> None:
    c = ResultCache()
    assert c.accounted_bytes == 0 and c.entries == 0
    c.put(b"k1", b"x" * 100)
    assert c.accounted_bytes == 2 + 100 + ENTRY_OVERHEAD
    c.put(b"k2", b"y" * 50)
    c.put(b"k1", b"z" * 10)                     # replacement: the old size is given back
    assert c.accounted_bytes == size_of(b"k1", b"z" * 10) + size_of(b"k2", b"y" * 50)
    assert c.entries == 2
    assert c.evict_lru(0) == (0, 0)
    n, freed = c.evict_lru(10**9)               # more than everything: empties, reports all
    assert (n, freed) == (2, size_of(b"k1", b"z" * 10) + size_of(b"k2", b"y" * 50))
    assert c.accounted_bytes == 0 and c.entries == 0
    assert c.evict_lru(100) == (0, 0)
    c.put(b"k3", b"w")
    c.clear()
    assert c.accounted_bytes == 0 and c.entries == 0 and c.get(b"k3") is None
    st = c.stats()
    assert st["evictions"] == 2 and st["evicted_bytes"] == freed
    assert set(st) >= {"hits", "misses", "hit_ratio", "entries", "accounted_bytes", "evictions",
                       "evicted_bytes", "refusals"}


def test_hit_ratio() -> None:
    c = ResultCache()
    assert c.stats()["hit_ratio"] == 0.0
    c.put(b"a", b"1")
    for _ in range(3):
        c.get(b"a")
    c.get(b"b")
    st = c.stats()
    assert (st["hits"], st["misses"], st["hit_ratio"]) == (3, 1, 0.75)


def test_values_are_copied_to_immutable_bytes() -> None:
    c = ResultCache()
    buf = bytearray(b"abc")
    c.put(b"k", buf)
    buf[0] = ord("X")
    assert c.get(b"k") == b"abc"
    assert c.accounted_bytes == size_of(b"k", b"abc")


def test_accounting_matches_tracemalloc_within_a_quarter() -> None:
    """ENTRY_OVERHEAD is a real measurement: the accounted bytes of 20,000 entries of 1,000-byte
    values are within 25% of what tracemalloc sees the cache allocate (tracemalloc misses glibc's
    chunk headers, so it reads a little lower)."""
    keys = [cache_key("d", "s", i.to_bytes(8, "little")) for i in range(20_000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        c = ResultCache()
        for i, k in enumerate(keys):
            c.put(k, i.to_bytes(8, "little") + bytes(992))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.75 * c.accounted_bytes <= used <= 1.25 * c.accounted_bytes, (used, c.accounted_bytes)


# ------------------------------------------------------------------ TTL

def test_ttl_expires_on_read_and_is_dropped() -> None:
    clock = FakeClock()
    c = ResultCache(clock=clock)
    c.put(b"t", b"v" * 10, ttl_s=5.0)
    c.put(b"p", b"q")                           # no TTL
    assert c.accounted_bytes == size_of(b"t", b"v" * 10, ttl=True) + size_of(b"p", b"q")
    clock.t += 4.999
    assert c.get(b"t") == b"v" * 10
    clock.t += 0.001                            # exactly at expiry: expired
    assert c.get(b"t") is None
    assert c.entries == 1 and b"t" not in c
    assert c.accounted_bytes == size_of(b"p", b"q") == recount(c)
    clock.t += 10**6
    assert c.get(b"p") == b"q"                  # entries without TTL never expire
    st = c.stats()
    assert st["expired"] == 1 and st["misses"] == 1 and st["hits"] == 2


def test_ttl_replacement_and_non_positive_ttl() -> None:
    clock = FakeClock()
    c = ResultCache(clock=clock)
    c.put(b"k", b"1", ttl_s=1.0)
    c.put(b"k", b"22")                          # replaced without TTL: no longer expires
    assert c.accounted_bytes == size_of(b"k", b"22") == recount(c)
    clock.t += 5
    assert c.get(b"k") == b"22"
    c.put(b"k", b"333", ttl_s=2.0)              # and back to a TTL
    assert c.accounted_bytes == size_of(b"k", b"333", ttl=True) == recount(c)
    assert c.put(b"k", b"4", ttl_s=0) is True   # expires at once: nothing stored, not a refusal
    assert c.entries == 0 and c.accounted_bytes == 0
    assert c.put(b"n", b"4", ttl_s=-1) is True and c.entries == 0
    assert c.stats()["refusals"] == 0


def test_purge_expired_drops_only_expired_entries() -> None:
    clock = FakeClock()
    c = ResultCache(clock=clock)
    for i in range(10):
        c.put(b"e%d" % i, b"x" * 100, ttl_s=1.0 + i)
    c.put(b"forever", b"y")
    clock.t += 5.5                              # e0..e4 expired
    n, freed = c.purge_expired()
    assert n == 5 and freed == 5 * size_of(b"e0", b"x" * 100, ttl=True)
    assert c.entries == 6 and c.accounted_bytes == recount(c)
    assert c.stats()["expired"] == 5 and c.stats()["evictions"] == 0
    assert c.purge_expired() == (0, 0)


def test_eviction_of_ttl_entries_accounts_their_overhead() -> None:
    c = ResultCache(clock=FakeClock())
    c.put(b"a", b"1", ttl_s=10)
    c.put(b"b", b"2")
    n, freed = c.evict_lru(1)
    assert (n, freed) == (1, size_of(b"a", b"1", ttl=True))
    assert c.accounted_bytes == recount(c) and not c._expires


# ------------------------------------------------------------------ admission

def test_refusal_at_critical_still_answers_reads() -> None:
    c = ResultCache()
    c.put(b"old", b"value")
    c.admitting = False
    assert c.put(b"new", b"x") is False
    assert c.put(b"old", b"replaced") is False   # replacements are refused too
    assert c.get(b"old") == b"value"
    assert c.get(b"new") is None
    assert c.stats()["refusals"] == 2 and c.stats()["admitting"] is False
    c.admitting = True
    assert c.put(b"new", b"x") is True and c.get(b"new") == b"x"


# ------------------------------------------------------------------ threads

def test_concurrent_use_keeps_accounting_exact() -> None:
    clock = FakeClock()
    c = ResultCache(clock=clock)
    errors: list[BaseException] = []
    deadline = time.monotonic() + 10

    def worker(j: int) -> None:
        try:
            for i in range(4000):
                k = b"k%d" % ((i * 7 + j) % 500)
                if i % 5 == 0:
                    c.put(k, b"v" * (i % 300), ttl_s=(None if i % 3 else 0.5))
                elif i % 5 == 1:
                    c.evict_lru(700)
                elif i % 97 == 0:
                    c.purge_expired()
                else:
                    c.get(k)
                if time.monotonic() > deadline:
                    return
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    def ticker() -> None:
        for _ in range(200):
            clock.t += 0.01

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(6)] + [threading.Thread(target=ticker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not errors
    assert c.accounted_bytes == recount(c)
    assert set(c._expires) <= set(c._data)
    st = c.stats()
    assert st["hits"] + st["misses"] > 0 and st["entries"] == len(c._data)
