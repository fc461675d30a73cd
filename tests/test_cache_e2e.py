"""The result cache through real coordinator and agent processes."""
from __future__ import annotations

import json
import subprocess
import sys


def test_second_identical_call_is_answered_from_the_cache(cluster):
    with cluster.client() as c:
        first = c.envelope("demo.cpu_burn", {"rounds": 123_457})
        assert first.ok and not first.cache_hit and first.executed_by.startswith("agent")
        second = c.envelope("demo.cpu_burn", {"rounds": 123_457})
        assert second.cache_hit and second.executed_by == "cache" and second.attempts == 0
        assert second.result == first.result
        other = c.envelope("demo.cpu_burn", {"rounds": 123_458})
        assert not other.cache_hit  # a different input is a different key


def test_cache_key_uses_the_validated_input(cluster):
    with cluster.client() as c:
        a = c.envelope("math.compute", {"a": 1, "b": 2.0, "op": "add"})
        b = c.envelope("math.compute", {"op": "add", "b": 2, "a": 1.0})  # same input, other spelling
    assert not a.cache_hit and b.cache_hit


def test_services_that_are_not_pure_are_never_cached(cluster):
    with cluster.client() as c:
        for _ in range(2):
            env = c.envelope("demo.sleep", {"seconds": 0})
            assert not env.cache_hit and env.executed_by != "cache"


def test_cache_stats_cli(cluster):
    with cluster.client() as c:
        c.envelope("math.compute", {"a": 5, "b": 5, "op": "mul"})
        c.envelope("math.compute", {"a": 5, "b": 5, "op": "mul"})
    r = subprocess.run([sys.executable, "-m", "microswarm.cli", "cache", "stats", "--json"], capture_output=True,
                       text=True, env=cluster.env(), timeout=60)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    for key in ("hits", "misses", "hit_ratio", "entries", "accounted_bytes", "heap_bytes", "evictions"):
        assert key in stats, key
    assert stats["hits"] >= 1 and stats["entries"] >= 1
    r = subprocess.run([sys.executable, "-m", "microswarm.cli", "cache", "stats"], capture_output=True, text=True,
                       env=cluster.env(), timeout=60)
    assert r.returncode == 0 and "hits" in r.stdout
