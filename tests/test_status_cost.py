"""What a Status costs the coordinator's event loop at thousands of agents (issue 11, "cheap
answers"): a reply is built at most once per STATUS_TTL_S for each view, so repeated and
concurrent callers share one build instead of each taking the loop for the whole list."""
from __future__ import annotations

import asyncio
import time

from microswarm.coordinator.agents import AgentSession
from microswarm.coordinator.server import STATUS_TTL_S, Coordinator, CoordinatorConfig

AGENTS = 3000


def _coordinator(tmp_path) -> Coordinator:
    c = Coordinator(CoordinatorConfig(state_dir=str(tmp_path), local_slots=1, cache=False, advertise=False))
    c.registry.load()
    digests = {e.digest for e in c.registry.current()}
    assert digests
    for i in range(AGENTS):
        aid = f"agent{i:05d}"
        c.agents[aid] = AgentSession(agent_id=aid, agent_key=b"k" * 32, address=f"10.0.{i // 250}.{i % 250}:4000",
                                     slots=4, hostname=f"h{i}", channel=None, coordinator=c,  # type: ignore[arg-type]
                                     state="ready", holdings=set(digests), token_name=f"vol{i % 40}")
    return c


def test_status_at_3000_agents_builds_the_agents_once_per_interval_and_shares_them(tmp_path):
    async def main() -> None:
        c = _coordinator(tmp_path)
        t0 = time.perf_counter()
        full = c.status(20, operator=True)
        build_ms = (time.perf_counter() - t0) * 1000
        assert len(full.agents) == AGENTS and not full.redacted
        assert all(s.agents == AGENTS for s in full.services)
        built = t0 = time.perf_counter()
        n = 0  # up to 100 callers, all within the interval (under load fewer fit): one build between them
        while n < 100 and (n == 0 or time.perf_counter() - built < STATUS_TTL_S * 0.6):
            again = c.status(20, operator=True)
            n += 1
        shared_ms = (time.perf_counter() - t0) * 1000 / n
        assert again.agents == full.agents and shared_ms < build_ms / 4, (shared_ms, build_ms)
        assert c._agents_view(True) is c._agents_view(True)
        hidden = c.status(20, operator=False)  # each view is built (and kept) on its own
        assert hidden.redacted and not {a.agent_id for a in hidden.agents} & set(c.agents)
        assert all(a.address == "" and a.agent_id.startswith("agent-") for a in hidden.agents)
        assert {a.agent_id for a in hidden.agents} == {c.state.pseudonym(aid) for aid in c.agents}  # once
        assert c.status(20, operator=True).agents[0].agent_id in c.agents  # the operator's view stays whole
        assert c.status(20, operator=False).agents == hidden.agents  # pseudonyms are not applied twice
        c.drop_agent(c.agents["agent00000"], "test")  # an agent that leaves is gone at once
        assert len(c.status(20, operator=True).agents) == AGENTS - 1
        await asyncio.sleep(STATUS_TTL_S + 0.05)
        fresh = c.status(20, operator=True)
        assert fresh.agents[0].last_heartbeat_s > full.agents[0].last_heartbeat_s  # never older than the TTL
        print(f"Status at {AGENTS} agents: {build_ms:.0f} ms to build, {shared_ms:.2f} ms per call "
              f"within {STATUS_TTL_S} s (the agents built once, the rest fresh)")
        c.auth.close()
        c.calllog.close()

    asyncio.run(main())
