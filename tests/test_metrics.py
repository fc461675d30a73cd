"""/metrics through a real coordinator with agents, parsed by the Prometheus client's own parser."""
from __future__ import annotations

import urllib.error
import urllib.request
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from microswarm.cluster import LocalCluster

FAMILIES = ["microswarm_calls", "microswarm_call_duration_seconds", "microswarm_agents_connected",
            "microswarm_jobs_in_flight", "microswarm_cache_hits", "microswarm_cache_misses", "microswarm_cache_bytes",
            "microswarm_cache_evictions", "microswarm_governor_heap_bytes"]


@pytest.fixture(scope="module")
def http_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(agents=1, slots=2, http=True, workdir=str(tmp_path_factory.mktemp("metrics")))
    with c:
        yield c


def scrape(c: LocalCluster, headers: dict[str, str] | None = None) -> dict[str, dict[tuple, float]]:
    with c.urlopen(urllib.request.Request(c.http_url + "/metrics", headers=headers or {}), timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return sum(v for k, v in m.get(name, {}).items() if all((lk, lv) in k for lk, lv in labels.items()))


def test_every_family_the_operators_need_is_there(http_cluster):
    with http_cluster.urlopen(http_cluster.http_url + "/metrics", timeout=10) as r:
        families = {f.name: f.type for f in text_string_to_metric_families(r.read().decode())}
    for fam in FAMILIES:
        assert fam in families, fam
    assert families["microswarm_calls"] == "counter"
    assert families["microswarm_call_duration_seconds"] == "histogram"
    m = scrape(http_cluster)
    assert value(m, "microswarm_agents_connected") == 1
    assert value(m, "microswarm_governor_heap_bytes") > 10_000_000  # a Python process's real memory


def test_counters_move_with_real_calls(http_cluster):
    before = scrape(http_cluster)
    with http_cluster.client() as c:
        for i in range(3):
            assert c.envelope("math.compute", {"a": 1000 + i, "b": 1, "op": "add"}).ok  # misses, run by the agent
        assert c.envelope("math.compute", {"a": 1000, "b": 1, "op": "add"}).cache_hit  # a hit
        assert c.envelope("math.compute", {"a": "x", "b": 1}).error["code"] == "invalid_input"
    after = scrape(http_cluster)
    d = lambda name, **kw: value(after, name, **kw) - value(before, name, **kw)  # noqa: E731
    from microswarm.coordinator.state import StateDir
    alias = StateDir(http_cluster.state).pseudonym("agent1")  # an open /metrics does not name volunteers
    assert d("microswarm_calls_total", service="math.compute", outcome="success", executed_by=alias) == 3
    assert not any("agent1" in dict(k).values() for series in after.values() for k in series)
    assert d("microswarm_calls_total", service="math.compute", outcome="success", executed_by="cache") == 1
    assert d("microswarm_calls_total", service="math.compute", outcome="invalid_input") == 1
    assert d("microswarm_call_duration_seconds_count", service="math.compute") == 5
    assert d("microswarm_cache_hits_total") == 1
    assert d("microswarm_cache_misses_total") == 3
    assert value(after, "microswarm_cache_bytes") > 0


def test_unknown_services_do_not_grow_the_label_set(http_cluster):
    with http_cluster.client() as c:
        for i in range(5):
            c.envelope(f"nope.svc{i}", {})
    m = scrape(http_cluster)
    services = {dict(k).get("service") for k in m["microswarm_calls_total"]}
    assert "unknown" in services and not any(s and s.startswith("nope.") for s in services)


def test_metrics_can_require_a_token(tmp_path):
    with LocalCluster(agents=0, http=True, workdir=str(tmp_path), coordinator_args=["--metrics-auth"]) as c:
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(c)
        assert e.value.code == 401 and "Bearer" in e.value.headers.get("WWW-Authenticate", "")
        from microcores.client import Client
        with Client(c.addr, state_dir=str(c.state)) as client:
            token = client.token()
        assert token
        assert "microswarm_agents_connected" in scrape(c, {"Authorization": f"Bearer {token}"})


def test_label_values_stay_bounded_as_agents_come_and_go():
    """Agent ids change with every agent process and services may raise codes of their own:
    months of churn must not grow the series without end."""
    from types import SimpleNamespace

    from microswarm.coordinator.calllog import CallEntry
    from microswarm.coordinator.metrics import MAX_OUTCOMES, Metrics
    from microswarm.coordinator.verify import Verifier

    class Queue(list):  # the scheduler's line for agent slots, empty
        on_wait = None

    c = SimpleNamespace(agents={}, registry=SimpleNamespace(services={"math.compute": None}),
                        dispatcher=SimpleNamespace(observers=[], in_flight=0), local=SimpleNamespace(running=0),
                        cache_stats=lambda: {}, quarantine=SimpleNamespace(total=0), verifier=Verifier(),
                        scheduler=SimpleNamespace(queue=Queue(), counts=dict.fromkeys(
                            ("retries", "hedges", "late_results", "outcome_unknown"), 0)))
    m = Metrics(c, require_token=True)  # type: ignore[arg-type]  (real ids: the operator's view)

    def agent(i: int) -> dict[str, SimpleNamespace]:
        return {f"vol-{i}": SimpleNamespace(agent_id=f"vol-{i}", running=0, slots=1, quarantined=False)}

    def call(who: str, success: bool = True, code: str = "") -> None:
        for observe in c.dispatcher.observers:
            observe(CallEntry(0.0, "cli", "ipv4:127.0.0.1:1", "math.compute", who, success, 1.0, code), None)

    def series() -> dict[tuple, float]:
        fams = text_string_to_metric_families(m.render().decode())
        return {tuple(sorted(s.labels.items())): s.value
                for f in fams if f.name == "microswarm_calls" for s in f.samples if s.name.endswith("_total")}

    for i in range(200):
        c.agents = agent(i)
        call(f"vol-{i}")
        call(f"vol-{i}", False, f"custom_code_{i}")
        if i % 2:
            c.agents = {}
            call(f"vol-{i}")  # its answer came after it left
        if i % 7 == 0:
            series()  # a scrape now and then, as Prometheus does
    s = series()
    runners = {dict(k)["executed_by"] for k in s}
    assert runners == {"vol-199", "agent"} or runners == {"agent"}, runners
    outcomes = {dict(k)["outcome"] for k in s}
    assert len(outcomes) <= MAX_OUTCOMES + 1
    assert sum(v for k, v in s.items() if dict(k)["executed_by"] == "agent") == 100
    c.agents = agent(200)
    call("vol-200", False, "custom_code_0")
    call("vol-200", False, "custom_code_199")  # past the first MAX_OUTCOMES codes
    s = series()
    assert {dict(k)["outcome"] for k in s if dict(k)["executed_by"] == "vol-200"} == {"custom_code_0", "other"}
    assert not any(dict(k)["executed_by"].startswith("vol-1") for k in s)
