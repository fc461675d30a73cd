"""Result verification (--verify): lying volunteers, real processes.

A lying agent (tests/data/lying_agent.py) is the real agent whose results are rewritten on the
way out. Under `always`, and under `adaptive` while it is untrusted, none of its lies reaches a
client or the cache; the coordinator's own answer stands, the liar is quarantined and loses its
trust, and every cache entry it helped compute is purged. The unit tests pin the policy itself.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from microswarm.coordinator.cache import ResultCache
from microswarm.coordinator.verify import Outcome, Verifier, made_by, opened, seal
from microcores import _codec
from microswarm.cluster import LocalCluster, wait_for

LIAR = Path(__file__).parent / "data" / "lying_agent.py"


# ---------------------------------------------------------------- the policy


def ok(executor: str, value: float) -> Outcome:
    return Outcome(executor, _codec.pack({"result": value}), attempts=1)


def settle(v: Verifier, first: Outcome, second: Outcome, referee: Outcome | None = None) -> tuple[Outcome, bool, list[str]]:
    convicted: list[str] = []
    ran: list[str] = []

    async def run_second() -> Outcome:
        ran.append("second")
        return second

    async def run_referee() -> Outcome:
        ran.append("referee")
        assert referee is not None, "the referee was not expected to run"
        return referee

    answer, verified = asyncio.run(v.settle(first, run_second, run_referee, lambda a, why: convicted.append(a)))
    return answer, verified, convicted


def test_an_untrusted_agent_is_confirmed_and_earns_trust_after_n_agreements() -> None:
    v = Verifier("adaptive", trust_after=3, spot_check=0.0)
    for i in range(3):
        assert v.trust("a1", False) == "new"
        answer, verified, convicted = settle(v, ok("a1", i), ok("a2", i))
        assert verified and answer.output == ok("a1", i).output and answer.verified_by == "a2" and not convicted
    assert v.trust("a1", False) == "trusted" and v.of("a1").agreements == 3
    answer, verified, _ = settle(v, ok("a1", 9), ok("a2", 0))  # trusted, spot-check 0: no second opinion
    assert not verified and answer.executor == "a1" and v.counts.unverified == 1


def test_a_disagreement_is_settled_by_the_coordinator_and_the_liar_convicted() -> None:
    v = Verifier("always")
    answer, verified, convicted = settle(v, ok("liar", 1337), ok("honest", 42), ok("coordinator", 42))
    assert verified and answer.executor == "coordinator" and _codec.unpack(answer.output) == {"result": 42}
    assert convicted == ["liar"]
    assert v.of("liar").disagreements == 1 and v.trust("liar", False) == "new"
    assert v.of("honest").agreements == 1 and v.counts.disagreed == 1


def test_when_the_coordinator_is_the_second_executor_its_answer_stands_without_a_referee() -> None:
    v = Verifier("always")
    answer, verified, convicted = settle(v, ok("liar", 1337), ok("coordinator", 42))
    assert verified and _codec.unpack(answer.output) == {"result": 42} and convicted == ["liar"]


def test_a_forged_output_is_always_checked_even_from_a_trusted_agent() -> None:
    v = Verifier("adaptive", trust_after=1, spot_check=0.0)
    settle(v, ok("a1", 1), ok("a2", 1))
    assert v.trust("a1", False) == "trusted"
    forged = Outcome("a1", error=("bad_output", "agent a1 sent garbage", ""), forged=True)
    answer, verified, convicted = settle(v, forged, ok("a2", 5), ok("coordinator", 5))
    assert verified and _codec.unpack(answer.output) == {"result": 5} and convicted == ["a1"]
    assert v.trust("a1", False) == "new"


def test_spot_checks_follow_their_probability_and_off_checks_nothing() -> None:
    draws = iter([0.01, 0.9, 0.04, 0.5])
    v = Verifier("adaptive", trust_after=1, spot_check=0.05, rng=lambda: next(draws))
    v.agreed("a1")
    assert [v.wants_second("a1") for _ in range(4)] == [True, False, True, False]
    off = Verifier("off")
    assert not off.wants_second("a1") and not off.wants_second("new-agent")
    assert not Verifier("always").wants_second("coordinator")


@pytest.mark.parametrize("bad", [{"mode": "sometimes"}, {"trust_after": 0}, {"spot_check": 1.5}])
def test_bad_settings_are_refused_with_the_flag_named(bad: dict) -> None:
    with pytest.raises(ValueError, match="--verify|--trust-after|--spot-check"):
        Verifier(**bad)


def test_cache_entries_carry_their_producers_and_a_liars_are_purged() -> None:
    cache = ResultCache()
    cache.put(b"k1", seal(b"v1", ("liar", "honest"), True))
    cache.put(b"k2", seal(b"v2", ("honest", ""), True))
    cache.put(b"k3", seal(b"v3", ("liar",), False), ttl_s=60)
    assert opened(cache.get(b"k2") or b"") == (b"v2", ("honest", ""), True)
    before = cache.accounted_bytes
    n, freed = cache.purge(made_by("liar"))
    assert n == 2 and freed > 0 and cache.accounted_bytes == before - freed
    assert b"k1" not in cache and b"k3" not in cache and b"k2" in cache
    assert cache.stats()["purged"] == 2
    assert cache.purge(made_by("lia")) == (0, 0)  # ids are matched whole


# ---------------------------------------------------------------- real clusters


def start_liar(c: LocalCluster, agent_id: str, *liar_args: str, token: str = "") -> Path:
    lies = c.dir / f"{agent_id}.lies"
    f = open(c.dir / f"agent-{agent_id}.log", "ab")
    c._logs.append(f)
    p = subprocess.Popen([sys.executable, str(LIAR), "--lie-log", str(lies), *liar_args, "--",
                          "--coordinator", c.addr, "--token", token or c.token, "--id", agent_id, "--slots", "2",
                          "--state-dir", str(c.agent_state(agent_id))],
                         stdout=f, stderr=subprocess.STDOUT, env=c.env(), start_new_session=True)
    c.agents[agent_id] = p
    c.wait_agents_ready([agent_id], timeout=60)
    return lies


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator:
    made: list[LocalCluster] = []

    def make(agents: int, *coordinator_args: str, http: bool = False) -> LocalCluster:
        (tmp_path / f"c{len(made)}").mkdir()
        c = LocalCluster(agents=agents, slots=2, workdir=str(tmp_path / f"c{len(made)}"),
                         coordinator_args=list(coordinator_args), http=http)
        made.append(c)
        return c.start()
    yield make
    for c in made:
        c.stop()


def agent_info(c: LocalCluster, agent_id: str):
    with c.client() as cl:
        return next((a for a in cl.status(timeout=5).agents if a.agent_id == agent_id), None)


def lines(p: Path) -> list[str]:
    return p.read_text().splitlines() if p.exists() else []


def test_always_no_lie_reaches_a_client_or_the_cache_and_the_liar_is_quarantined(make_cluster) -> None:
    c = make_cluster(1, "--verify", "always", "--queue-wait", "0.2")
    lies = start_liar(c, "liar")
    inputs = [{"a": float(i), "b": 7.0, "op": "mul"} for i in range(1, 13)]
    with c.client() as cl:
        envs = [cl.envelope("math.compute", x) for x in inputs]
        for x, env in zip(inputs, envs):
            assert env.ok and env.result == {"result": x["a"] * 7}, (x, env)
            assert env.verified
        wait_for(lambda: lines(lies), 10, "the liar to have lied at least once")
        info = agent_info(c, "liar")
        assert info is not None and info.trust == "quarantined" and info.disagreements >= 1
        assert info.state == "quarantined"
        again = [cl.envelope("math.compute", x) for x in inputs]  # from the cache, or computed anew: right either way
        assert all(e.ok and e.result == {"result": x["a"] * 7} for x, e in zip(inputs, again))
        assert all(e.verified for e in again)
        st = cl.status(timeout=5)
        assert st.verify.mode == "always" and st.verify.disagreed_total >= 1


def test_adaptive_an_untrusted_liar_never_reaches_a_client_nor_the_cache(make_cluster) -> None:
    c = make_cluster(1, "--queue-wait", "0.2")  # adaptive is the default
    lies = start_liar(c, "liar")
    inputs = [{"a": float(i), "b": 3.0, "op": "add"} for i in range(20)]
    with c.client() as cl:
        for x in inputs:
            env = cl.envelope("math.compute", x)
            assert env.ok and env.result == {"result": x["a"] + 3}, (x, env)
        assert lines(lies), "the liar never got a job: the test shows nothing"
        assert agent_info(c, "liar").trust == "quarantined"
        for x in inputs:
            env = cl.envelope("math.compute", x)
            assert env.cache_hit and env.result == {"result": x["a"] + 3}, (x, env)
        liar = agent_info(c, "liar")
        assert liar.agreements == 0 and liar.disagreements >= 1 and liar.jobs_done >= 1


def test_adaptive_honest_agents_earn_trust_and_are_then_only_spot_checked(make_cluster) -> None:
    c = make_cluster(2, "--trust-after", "3", "--spot-check", "0", "--queue-wait", "0.2")
    with c.client() as cl:
        first = cl.envelope("math.compute", {"a": 1, "b": 1})
        assert first.verified
        for i in range(40):
            cl.envelope("math.compute", {"a": i, "b": 100})
            agents = cl.status(timeout=5).agents
            if all(a.trust == "trusted" for a in agents):
                break
        agents = cl.status(timeout=5).agents
        assert [a.trust for a in agents] == ["trusted", "trusted"], [(a.agent_id, a.trust) for a in agents]
        assert all(a.agreements >= 3 and a.disagreements == 0 for a in agents)
        env = cl.envelope("math.compute", {"a": 5, "b": 1000})
        assert env.ok and env.result == {"result": 1005} and env.executed_by in {"agent1", "agent2"}
        assert not env.verified  # trusted and not spot-checked: accepted as it came


def test_a_trusted_agent_that_turns_liar_is_caught_by_spot_checks_and_its_cache_entries_purged(make_cluster) -> None:
    c = make_cluster(0, "--trust-after", "2", "--spot-check", "0.3", "--local-slots", "1", "--queue-wait", "5")
    lies = start_liar(c, "liar", "--lie-after", "6")
    answered: dict[float, float] = {}
    with c.client() as cl:
        for i in range(120):
            env = cl.envelope("math.compute", {"a": float(i), "b": 0.5, "op": "sub"})
            assert env.ok
            answered[float(i)] = env.result["result"]
            info = agent_info(c, "liar")
            if info is not None and info.trust == "quarantined":
                break
        else:
            pytest.fail("the liar was never caught in 120 calls at a 30% spot-check")
        assert lines(lies), "caught without having lied"
        wrong = [a for a, r in answered.items() if r != a - 0.5]
        assert len(wrong) <= len(lines(lies))  # lies it told as a trusted agent, unverified, may have gone out...
        st = cl.status(timeout=5)
        assert st.verify.purged_total >= 1  # ...but each was cached with its producer, and is purged now
        for a in answered:
            env = cl.envelope("math.compute", {"a": a, "b": 0.5, "op": "sub"})
            assert env.result == {"result": a - 0.5}, (a, env)


def test_over_http_a_forged_output_is_caught_and_metrics_count_the_disagreement(make_cluster) -> None:
    import json
    import urllib.request

    c = make_cluster(0, "--queue-wait", "0.2", http=True)
    lies = start_liar(c, "forger", "--forge")
    with c.client() as cl:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {cl.token()}"}

    def call(a: float) -> dict:
        req = urllib.request.Request(f"{c.http_url}/v1/math/compute", data=json.dumps({"a": a, "b": 2, "op": "mul"}).encode(),
                                     headers=headers, method="POST")
        with c.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    envs = [call(float(i)) for i in range(6)]
    assert lines(lies), "the forger never got a job"
    assert all(e["status"] == "ok" and e["result"] == {"result": i * 2.0} for i, e in enumerate(envs)), envs
    assert all(e["verified"] for e in envs)
    assert agent_info(c, "forger").trust == "quarantined"
    with c.urlopen(f"{c.http_url}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    disagreed = [ln for ln in metrics.splitlines() if ln.startswith('microswarm_verifications_total{outcome="disagreed"}')]
    assert disagreed and float(disagreed[0].split()[-1]) >= 1, disagreed


def test_verify_off_accepts_what_agents_say(make_cluster) -> None:
    """The control: without verification a liar's answer does reach the client (why adaptive is the default)."""
    c = make_cluster(0, "--verify", "off", "--queue-wait", "5")
    lies = start_liar(c, "liar")
    with c.client() as cl:
        env = cl.envelope("math.compute", {"a": 2, "b": 2})
    assert lines(lies) and env.executed_by == "liar"
    assert env.result == {"result": 1337} and not env.verified


def test_two_agents_of_one_volunteer_cannot_confirm_each_others_lies(make_cluster) -> None:
    """Both agents of the named token 'mallory' tell the same lie: were one allowed to confirm the
    other, 1337 would go out verified. The second opinion must come from another volunteer (here,
    with none, the coordinator)."""
    c = make_cluster(0, "--verify", "always", "--queue-wait", "5")
    minted = subprocess.run([sys.executable, "-m", "microswarm.cli", "coordinator", "token", "--state-dir", str(c.state),
                             "--name", "mallory"], capture_output=True, text=True, env=c.env(), timeout=60)
    token = minted.stdout.strip().splitlines()[-1]
    lies = [start_liar(c, f"mallory{i}", token=token) for i in (1, 2)]
    with c.client() as cl:
        for i in range(8):
            env = cl.envelope("math.compute", {"a": float(i), "b": 1.0})
            assert env.ok and env.result == {"result": i + 1.0} and env.verified, env
        told = [aid for aid, log in zip(("mallory1", "mallory2"), lies) if lines(log)]
        assert told, "neither agent of the volunteer got a job"
        for aid in told:
            info = agent_info(c, aid)
            assert info.trust == "quarantined" and info.agreements == 0, (aid, info)
