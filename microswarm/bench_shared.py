"""`shared_cache_hit_p50_ms`: the latency of a hit served from Redis, not from the near cache (issue 14).

Given two coordinators on one Redis (`--cache-url`, the default `--cache-write through`), each
input is computed once behind A (so it is in Redis when A's answer arrives) and then asked once of
B, whose near cache cannot hold it yet: B's answer is a near miss, a Redis hit. The figure is the
median of B's answers as the client sees them (one call at a time, a warmed-up connection), the
same measure as `bench`'s p50_ms. Each of B's answers must say cache_hit, and B's `shared_hits`
must have grown by the number of calls, or the figure would be of something else: it raises then.
For comparison the same inputs are then asked of B again (its near cache now): `near_hit_p50_ms`.
"""
from __future__ import annotations

import json
import statistics
import time
import uuid
from typing import Any

SERVICE = "math.compute"  # a built-in pure service: the same digest, so the same cache keys, everywhere


def _shared_hits(client: Any) -> int:
    st = client.status(timeout=10)
    return int(json.loads(st.cache_json or b"{}").get("shared_hits", -1))


def shared_cache_figures(a: str, b: str, n: int = 200, *, a_kwargs: dict[str, Any] | None = None,
                         b_kwargs: dict[str, Any] | None = None, warmup: int = 10) -> dict[str, Any]:
    """{"shared_cache_hit_p50_ms", "near_hit_p50_ms", "calls"} for coordinators at `a` and `b`.

    `a_kwargs`/`b_kwargs` go to microcores.client.Client (state_dir, insecure, fingerprint, ...)."""
    from microcores.client import Client

    salt = uuid.uuid4().int % 1_000_000  # inputs no earlier run left in Redis
    with Client(a, **(a_kwargs or {})) as ca, Client(b, **(b_kwargs or {})) as cb:
        for i in range(warmup):  # connections, tokens, the coordinators' own first-call costs
            x = {"a": float(salt), "b": float(-1 - i)}
            ca.envelope(SERVICE, x)
            cb.envelope(SERVICE, x)
        before = _shared_hits(cb)
        shared: list[float] = []
        inputs = [{"a": float(salt), "b": float(i)} for i in range(n)]
        for x in inputs:
            env = ca.envelope(SERVICE, x)
            if not env.ok:
                raise RuntimeError(f"{SERVICE} on {a} failed: {env.error}")
            t0 = time.perf_counter()
            env = cb.envelope(SERVICE, x)
            shared.append((time.perf_counter() - t0) * 1000)
            if not env.ok or not env.cache_hit:
                raise RuntimeError(f"{b} did not answer {x} from the cache (is it on the same Redis as {a}, "
                                   f"with --cache-write through?)")
        got = _shared_hits(cb) - before
        if got != n:
            raise RuntimeError(f"{b} served {got} of {n} hits from Redis: the rest came from elsewhere")
        near: list[float] = []
        for x in inputs:
            t0 = time.perf_counter()
            cb.envelope(SERVICE, x)
            near.append((time.perf_counter() - t0) * 1000)
    return {"shared_cache_hit_p50_ms": round(statistics.median(shared), 3),
            "near_hit_p50_ms": round(statistics.median(near), 3), "calls": n}


def shared_cache_hit_p50_ms(a: str, b: str, n: int = 200, **kwargs: Any) -> float:
    """The p50 (ms) of a hit served from Redis by `b` for results computed behind `a` (see the module)."""
    return float(shared_cache_figures(a, b, n, **kwargs)["shared_cache_hit_p50_ms"])


if __name__ == "__main__":  # python -m microswarm.bench_shared: two coordinators on a Redis of its own
    import tempfile

    from microswarm.cluster import LocalCluster
    from microswarm.redisserver import RedisServer

    with RedisServer() as r:
        args = ["--insecure", "--cache-url", r.url, "--local-slots", "1"]
        ca = LocalCluster(agents=0, workdir=tempfile.mkdtemp(prefix="microswarm-a-"), coordinator_args=args)
        cb = LocalCluster(agents=0, workdir=tempfile.mkdtemp(prefix="microswarm-b-"), coordinator_args=args)
        try:
            ca.start()
            cb.start()
            kw = {"insecure": True, "client_name": "bench"}
            print(json.dumps(shared_cache_figures(ca.addr, cb.addr, a_kwargs={**kw, "state_dir": str(ca.state)},
                                                  b_kwargs={**kw, "state_dir": str(cb.state)})))
        finally:
            ca.stop()
            cb.stop()
