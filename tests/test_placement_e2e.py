"""Placement with real processes: which agent holds which package under each strategy.

`coordinator start --placement common|expensive|combined` must end up, from the calls and run
times it observes, with the holders the strategy ranks first; `arbitrary` gives every used service
a holder and unused ones none; agents never hold more than `--max-packages`; a service nobody
holds is given to an agent on its first call; a package placement drops while an agent still
installs it is not held anyway; `--placement all --max-packages 1` holds exactly one package per
agent.

The services (tests/data/placement_services.py) sleep fixed times. The load every strategy test
drives, and what each strategy ranks first:

    service            calls   run time   total work
    placement.cheap      200      10 ms     >= 2.0 s
    placement.medium       6     100 ms     ~  0.6 s
    placement.slow         3     600 ms     ~  1.8 s

With two agents of `--max-packages 1`, two of the three used services can be held:
`common` (calls) holds cheap and medium, `expensive` (mean run time) slow and medium, `combined`
(calls x run time) cheap and slow. The margins are wide (the smallest is 2x on a score), so the
link's overhead on a loaded machine does not change the ranking. Each strategy's loser is called
first, so it is given to an agent on that first call and the strategy has to move it away.
"""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from microcores.client import publish
from microswarm.cluster import LocalCluster, wait_for

pytestmark = pytest.mark.timeout(120)

DATA = Path(__file__).resolve().parent / "data"
SERVICES = DATA / "placement_services.py"
CHEAP, MEDIUM, SLOW, UNUSED = "placement.cheap", "placement.medium", "placement.slow", "placement.unused"
SLOW_START = "placement.slow_start"   # 4 s to load in a worker: a long install
USED = {CHEAP, MEDIUM, SLOW}

# Daemons that stop promptly at the end of a test.
FAST_STOP_COORDINATOR = ["--drain", "1"]
FAST_STOP_AGENT = ["--drain", "1"]


# ---------------------------------------------------------------- helpers

def holdings(client: Any) -> dict[str, set[str]]:
    """Agent id -> the service names status says it holds (installed and ready)."""
    return {a.agent_id: set(a.packages) for a in client.status().agents}


def holders(held: dict[str, set[str]], service: str) -> set[str]:
    return {a for a, s in held.items() if service in s}


def worker_packages(cluster: LocalCluster, agent_id: str) -> set[str]:
    """The package directories (named by digest) of the live worker processes under one agent."""
    dirs: set[str] = set()
    try:
        kids = psutil.Process(cluster.agents[agent_id].pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return dirs
    for k in kids:
        try:
            if k.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = k.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if "microcores._worker" in cmd:
            dirs.add(Path(cmd[-1]).name)
    return dirs


class Watch:
    """Samples status every 0.1 s in the background: the most packages each agent was seen to hold,
    whatever happened between the test's own looks."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.most: dict[str, int] = {}
        self.seen: dict[str, set[str]] = {}   # agent -> every service it was seen holding
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.cluster.client() as c:
            while not self._stop.is_set():
                try:
                    st = c.status(timeout=5)
                except Exception:  # a slow answer under load: the next sample will do
                    continue
                for a in st.agents:
                    self.most[a.agent_id] = max(self.most.get(a.agent_id, 0), len(a.packages))
                    self.seen.setdefault(a.agent_id, set()).update(a.packages)
                self.samples += 1
                self._stop.wait(0.1)

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def start_cluster(tmp: Path, placement: str, agents: int, max_packages: int | None, slots: int = 2,
                  wait_ready: bool = True) -> LocalCluster:
    extra = ["--max-packages", str(max_packages)] if max_packages is not None else []
    c = LocalCluster(agents=agents, slots=slots, workdir=str(tmp),
                     coordinator_args=["--placement", placement, *FAST_STOP_COORDINATOR],
                     agent_args=[*extra, *FAST_STOP_AGENT])
    try:
        c.start_coordinator()
        publish(str(SERVICES), coordinator=c.addr, state_dir=str(c.state))
        for i in range(agents):
            c.start_agent(f"agent{i + 1}")
        if wait_ready:
            c.wait_agents_ready()
    except BaseException:
        c.stop()
        raise
    return c


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Any]:
    made: list[LocalCluster] = []

    def make(*args: Any, **kwargs: Any) -> LocalCluster:
        c = start_cluster(tmp_path, *args, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def drive(cluster: LocalCluster, first: str) -> list[Any]:
    """The load of the module docstring, `first` called once before the rest. Every call must succeed."""
    envs: list[Any] = []
    with cluster.client() as client:
        envs.append(client.envelope(first, {"n": -1}, timeout=60))
        # given to an agent on that call: held before the rest of the load says it should not be
        wait_for(lambda: holders(holdings(client), first), 20, f"an agent to hold {first}")

    def calls(service: str, n: int, tag: int) -> list[Any]:
        with cluster.client() as c:
            return [c.envelope(service, {"n": tag * 1000 + i}, timeout=60) for i in range(n)]

    counts = {CHEAP: 200, MEDIUM: 6, SLOW: 3}
    counts[first] -= 1
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(calls, CHEAP, counts[CHEAP] // 2, 1),
                pool.submit(calls, CHEAP, counts[CHEAP] - counts[CHEAP] // 2, 2),
                pool.submit(calls, MEDIUM, counts[MEDIUM], 3)]
        futs += [pool.submit(calls, SLOW, 1, 4 + i) for i in range(counts[SLOW])]
        for f in futs:
            envs += f.result(timeout=110)
    bad = [(e.service, e.error) for e in envs if not e.ok]
    assert not bad, bad[:5]
    assert len(envs) == 209
    return envs


def wait_holdings(cluster: LocalCluster, want: set[str], per_agent: int, timeout: float = 40) -> dict[str, set[str]]:
    """Until the agents together hold exactly `want`, each with `per_agent` packages, and every one is ready."""
    with cluster.client() as client:
        last: dict[str, Any] = {}

        def settled() -> bool:
            st = client.status()
            last["held"] = {a.agent_id: set(a.packages) for a in st.agents}
            last["states"] = {a.agent_id: a.state for a in st.agents}
            held = last["held"]
            return (len(held) == cluster.n_agents and set().union(*held.values()) == want
                    and all(len(s) == per_agent for s in held.values())
                    and all(s == "ready" for s in last["states"].values()))
        try:
            wait_for(settled, timeout, f"holdings {sorted(want)}", 0.2)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; last seen {last}\n" + cluster.log("coordinator.log")[-3000:]) from None
        return last["held"]


def assert_stable(cluster: LocalCluster, expected: dict[str, set[str]], seconds: float) -> None:
    """Holdings stay put across the next re-plans (every 2 s): no flapping once settled."""
    end = time.monotonic() + seconds
    with cluster.client() as client:
        while time.monotonic() < end:
            assert holdings(client) == expected
            time.sleep(0.25)


# ---------------------------------------------------------------- strategies

# strategy -> (the two services it holds, the one it drops: called first so that it starts held)
RANKED = {
    "common": ({CHEAP, MEDIUM}, SLOW),        # most calls per minute
    "expensive": ({SLOW, MEDIUM}, CHEAP),     # highest mean run time
    "combined": ({CHEAP, SLOW}, MEDIUM),      # most total work (calls x run time)
}


@pytest.mark.parametrize("strategy", sorted(RANKED))
def test_strategy_holds_what_it_ranks_first(make_cluster, strategy):
    want, loser = RANKED[strategy]
    c = make_cluster(strategy, agents=2, max_packages=1)
    with c.client() as client:
        st = client.status()
        assert st.placement == strategy
        # nothing is used yet: nothing is held (ready at once with an empty set)
        assert all(not a.packages for a in st.agents), [(a.agent_id, list(a.packages)) for a in st.agents]
        assert all(a.max_packages == 1 for a in st.agents)

    with Watch(c) as watch:
        envs = drive(c, first=loser)
        held = wait_holdings(c, want, per_agent=1)
        # one holder each: two agents of one package each, two services held
        for s in want:
            assert len(holders(held, s)) == 1, held
        assert_stable(c, held, 2.5)
    assert watch.samples > 10
    assert watch.most and max(watch.most.values()) <= 1, watch.most  # --max-packages 1, at every sample
    # the strategy moved what the first call had given: the loser was held at some point, not at the end
    assert loser in set().union(*watch.seen.values()), watch.seen
    assert not holders(held, loser)
    # the services held were served by volunteers in the end; the rest ran on the coordinator
    by = {e.executed_by for e in envs}
    assert by <= {"agent1", "agent2", "coordinator"}, by
    with c.client() as client:
        after = [client.envelope(s, {"n": 7}, timeout=60) for s in sorted(want)]
    assert all(e.ok and e.executed_by in held and e.service in held[e.executed_by] for e in after), \
        [(e.service, e.executed_by, e.error) for e in after]
    # on the agents too: the workers of a package moved away stop, each keeps only its one package's
    with c.client() as client:
        digest = {s.name: s.digest for s in client.status().services}
    want_dirs = {a: {digest[s] for s in held[a]} for a in held}
    seen_dirs: dict[str, set[str]] = {}

    def workers_match() -> bool:
        seen_dirs.update({a: worker_packages(c, a) for a in held})
        return seen_dirs == want_dirs
    try:
        wait_for(workers_match, 15, "the agents' workers")
    except TimeoutError as exc:
        names = {d: n for n, d in digest.items()}
        raise AssertionError(f"{exc}: want {want_dirs}, seen {seen_dirs} "
                             f"({ {a: [names.get(d, d) for d in ds] for a, ds in seen_dirs.items()} })") from None


def test_combined_gives_nothing_to_services_never_called(make_cluster):
    """Under `combined` with room for everything (no --max-packages), the used services are held and
    no agent holds a service nobody called: neither `placement.unused` nor the 6 built-ins."""
    c = make_cluster("combined", agents=2, max_packages=None)
    with c.client() as client:
        for s in (CHEAP, MEDIUM):
            for i in range(3):
                assert client.envelope(s, {"n": i}, timeout=60).ok

        def both_held() -> bool:
            held = holdings(client)
            return all(holders(held, s) for s in (CHEAP, MEDIUM))
        wait_for(both_held, 30, "the called services to be held")
        time.sleep(2.5)  # at least one more re-plan
        st = client.status()
        held = {a.agent_id: set(a.packages) for a in st.agents}
        services = {s.name for s in st.services}
        assert {UNUSED, "demo.sleep", "math.compute"} <= services and len(services) >= 11  # 6 built-ins, 5 published
        assert set().union(*held.values()) == {CHEAP, MEDIUM}, held
        assert not holders(held, UNUSED) and not holders(held, SLOW)
        counts = {s.name: s.agents for s in st.services}
        assert all(n == 0 for name, n in counts.items() if name not in (CHEAP, MEDIUM)), counts


def test_arbitrary_gives_every_used_service_a_holder(make_cluster):
    """`arbitrary`: every used service gets a holder, unused ones get none, --max-packages 2 holds."""
    c = make_cluster("arbitrary", agents=2, max_packages=2)
    with Watch(c) as watch, c.client() as client:
        for s in sorted(USED):
            for i in range(2):
                e = client.envelope(s, {"n": i}, timeout=60)
                assert e.ok, e.error

        def covered() -> bool:
            held = holdings(client)
            return all(holders(held, s) for s in USED) and set().union(*held.values()) == USED
        try:
            wait_for(covered, 30, "every used service to have a holder")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {holdings(client)}") from None
        time.sleep(2.5)  # a re-plan later, still so
        held = holdings(client)
        assert set().union(*held.values()) == USED, held
    assert watch.most and max(watch.most.values()) <= 2, watch.most
    assert all(not (seen - USED) for seen in watch.seen.values()), watch.seen  # never an unused one


# ---------------------------------------------------------------- first call

def test_a_service_nobody_holds_is_given_on_its_first_call(make_cluster):
    """Under a non-`all` placement a service nobody holds goes to an agent on its first call (not at
    the next re-plan); calls made meanwhile still succeed, on the coordinator or the new holder."""
    c = make_cluster("common", agents=2, max_packages=2)
    with c.client() as client:
        assert not holders(holdings(client), MEDIUM)
        e = client.envelope(MEDIUM, {"n": 1}, timeout=60)
        assert e.ok, e.error
        assert e.executed_by in {"agent1", "agent2", "coordinator"}
        # held right after its first call; the call waited for the install (up to --queue-wait 2 s),
        # so unless the machine is very loaded it already ran on the new holder
        who = wait_for(lambda: holders(holdings(client), MEDIUM), 10, f"an agent to hold {MEDIUM}")
        if e.executed_by != "coordinator":
            assert e.executed_by in who, (e.executed_by, who)
        assert f"placement: {MEDIUM} given to agent" in c.log("coordinator.log")

        # a burst of first calls of another service: all succeed, wherever they ran, and it gets held
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(client.envelope, SLOW, {"n": i}, timeout=60) for i in range(6)]
            envs = [f.result(timeout=90) for f in futs]
        assert all(x.ok for x in envs), [x.error for x in envs if not x.ok]
        assert {x.executed_by for x in envs} <= {"agent1", "agent2", "coordinator"}
        wait_for(lambda: holders(holdings(client), SLOW), 10, f"an agent to hold {SLOW}")
        # and later calls go to the volunteers
        later = [client.envelope(s, {"n": 9}, timeout=60) for s in (MEDIUM, SLOW)]
        assert all(x.ok and x.executed_by != "coordinator" for x in later), \
            [(x.service, x.executed_by, x.error) for x in later]
        held = holdings(client)
        assert set().union(*held.values()) <= {MEDIUM, SLOW}, held


def test_a_package_dropped_while_it_installs_is_not_held(make_cluster):
    """Placement changes its mind while an agent still installs a package: the agent must not end up
    holding it anyway, beyond its `--max-packages`.

    One agent, `--max-packages 1`, `common`. The first call of `placement.slow_start` (4 s to load in a
    worker) gives it to the agent; while its worker loads, 30 calls of `placement.cheap` make cheap the
    most common, so the next re-plan (every 2 s) tells the agent to hold cheap instead. The agent
    installs cheap, and then must not keep slow_start when its worker is finally up."""
    c = make_cluster("common", agents=1, max_packages=1)
    with Watch(c) as watch, c.client() as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        first = pool.submit(client.envelope, SLOW_START, {"n": 1}, timeout=60)
        wait_for(lambda: f"placement: {SLOW_START} given to agent" in c.log("coordinator.log"), 10,
                 f"{SLOW_START} to be given")
        cheap = [client.envelope(CHEAP, {"n": i}, timeout=60) for i in range(30)]
        assert all(e.ok for e in cheap), [e.error for e in cheap if not e.ok]
        assert first.result(timeout=60).ok
        wait_for(lambda: CHEAP in holdings(client).get("agent1", ()), 30, f"agent1 to hold {CHEAP}")
        # slow_start's worker on the agent has loaded by now (4 s after its install began, 2 s of
        # re-plan later): the agent holds cheap, and only cheap
        time.sleep(max(0.0, t0 + 10 - time.monotonic()))
        held = holdings(client)
        digest = {s.name: s.digest for s in client.status().services}
        later = client.envelope(SLOW_START, {"n": 2}, timeout=60)
    assert held == {"agent1": {CHEAP}}, f"agent1 (--max-packages 1) holds {held}"
    assert watch.most.get("agent1", 0) <= 1, (watch.most, watch.seen)
    assert later.ok and later.executed_by == "coordinator", (later.executed_by, later.error)
    # workers start when a package is first used: none of slow_start's is left, at most cheap's
    assert worker_packages(c, "agent1") <= {digest[CHEAP]}, (worker_packages(c, "agent1"), digest)


# ---------------------------------------------------------------- --placement all

def test_all_with_max_packages_holds_one_package_per_agent(make_cluster):
    """`all` with `--max-packages 1`: each agent holds exactly one package, the top one by total work
    (ties by name); `status --json` gives `packages`, `versions` and `placement`."""
    # LocalCluster.wait_agents_ready under `all` waits for every package: not with --max-packages
    c = make_cluster("all", agents=2, max_packages=1, wait_ready=False)
    with Watch(c) as watch, c.client() as client:
        def one_each() -> bool:
            st = client.status()
            return (len(st.agents) == 2 and all(a.state == "ready" and len(a.packages) == 1 for a in st.agents))
        wait_for(one_each, 40, "each agent to hold one package")
        st = client.status()
        names = sorted(s.name for s in st.services)
        held = {a.agent_id: set(a.packages) for a in st.agents}
        # nothing called yet: every score ties, the first name wins, on both agents
        assert held == {"agent1": {names[0]}, "agent2": {names[0]}}, (held, names)

        # total work moves it: the slow service becomes the one both hold
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            envs = list(pool.map(lambda i: client.envelope(SLOW, {"n": i}, timeout=60), range(3)))
        assert all(e.ok for e in envs), [e.error for e in envs]
        wait_for(lambda: holdings(client) == {"agent1": {SLOW}, "agent2": {SLOW}}, 30,
                 f"both agents to hold {SLOW}")

    assert watch.most and max(watch.most.values()) <= 1, watch.most
    out = subprocess.run([sys.executable, "-m", "microswarm.cli", "status", "--json"], env=c.env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["placement"] == "all"
    assert {a["agent_id"]: a["packages"] for a in d["agents"]} == {"agent1": [SLOW], "agent2": [SLOW]}
    assert all(a["versions"] == [f"{SLOW}@1"] for a in d["agents"]), d["agents"]
    assert all(a["max_packages"] == 1 for a in d["agents"])
