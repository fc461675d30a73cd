"""Agents bound to their keys, and refusals only the coordinator can make (issue 10).

Real processes and real crypto: a squatter after a coordinator restart, an agent's key and id
across its own restarts, and an on-path relay (tests/data/refusal_relay.py) that forges, signs
with its own key, provokes by tampering, and injects refusals: the honest agent never stops.
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import stat
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microswarm.agent.identity import claim
from microcores._secure import (fingerprint, handshake_seen, public_bytes, refusal_payload, refusal_verifies,
                                sign_refusal)
from microswarm.cluster import LocalCluster, free_port, wait_for

DATA = Path(__file__).resolve().parent / "data"
RELAY = DATA / "refusal_relay.py"


def spawn_agent(c: LocalCluster, name: str, *args: str, token: str | None = None,
                coordinator: str | None = None) -> subprocess.Popen[bytes]:
    """`microswarm agent start` with the given arguments, stopped with the cluster."""
    p = c._spawn(["agent", "start", "--coordinator", coordinator or c.addr, "--token", token or c.token,
                  "--slots", "1", *args], f"agent-{name}.log")
    c.agents[name] = p
    return p


def joined_id(c: LocalCluster, name: str, nth: int = 1) -> str:
    """The id the agent logged as joined with, once it has joined `nth` times."""
    def ids() -> list[str]:
        return re.findall(r"^agent (\S+) joined ", c.log(f"agent-{name}.log"), re.M)
    found = wait_for(lambda: len(ids()) >= nth and ids(), 40, f"{name} to join ({nth}x)")
    return found[nth - 1]


def restart_coordinator(c: LocalCluster) -> None:
    assert c.coordinator is not None
    os.killpg(c.coordinator.pid, signal.SIGTERM)
    assert c.coordinator.wait(30) == 0
    c.start_coordinator()


# ---------------------------------------------------------------- refusal signatures

def test_a_signed_refusal_binds_the_pinned_key_the_nonce_and_what_the_agent_sent():
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pinned = fingerprint(public_bytes(key))
    nonce, seen = secrets.token_bytes(32), handshake_seen(b"t" * 32, b"sig", b"mac")
    sig = sign_refusal(key, nonce, "agent_id_taken", "taken", seen)
    assert refusal_verifies(pinned, public_bytes(key), sig, nonce, "agent_id_taken", "taken", seen)
    assert not refusal_verifies(pinned, public_bytes(key), sig, secrets.token_bytes(32), "agent_id_taken", "taken",
                                seen)  # another attempt's nonce: a replay
    assert not refusal_verifies(pinned, public_bytes(key), sig, nonce, "agent_id_taken", "taken",
                                handshake_seen(b"t" * 32, b"sig", b"MAC"))  # the coordinator saw another proof
    assert not refusal_verifies(pinned, public_bytes(key), sig, nonce, "bad_join_secret", "taken", seen)
    forged = sign_refusal(other, nonce, "agent_id_taken", "taken", seen)
    assert not refusal_verifies(pinned, public_bytes(other), forged, nonce, "agent_id_taken", "taken", seen)
    assert not refusal_verifies(pinned, public_bytes(key), forged, nonce, "agent_id_taken", "taken", seen)
    assert not refusal_verifies(pinned, b"", b"", nonce, "agent_id_taken", "taken", seen)  # plaintext, unsigned
    assert refusal_payload(nonce, "a", "bc") != refusal_payload(nonce, "ab", "c")  # length-prefixed


def test_the_identity_is_kept_and_its_id_locked(tmp_path):
    first = claim(tmp_path)
    assert re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]+$", first.agent_id)
    assert stat.S_IMODE((tmp_path / "agent_key.pem").stat().st_mode) == 0o600
    second = claim(tmp_path)  # another agent in the same directory, at the same time: another id
    assert second.agent_id != first.agent_id and public_bytes(second.key) == public_bytes(first.key)
    try:
        claim(tmp_path, first.agent_id)
        raise AssertionError("two agents ran under one id from one directory")
    except ValueError as exc:
        assert "another agent with id" in str(exc)
    first.release()
    second.release()
    again = claim(tmp_path)
    assert again.agent_id == first.agent_id and public_bytes(again.key) == public_bytes(first.key)
    again.release()
    for bad in ("../x", "a/b", "-x", "x" * 65):
        try:
            claim(tmp_path, bad)
            raise AssertionError(f"id {bad!r} accepted")
        except ValueError:
            pass


# ---------------------------------------------------------------- real processes

def test_an_agent_keeps_its_key_and_id_across_restarts(tmp_path):
    """Without --id, in one shared state directory (the default): two agents get two ids, and
    each restart brings back the same key and id, so the binding holds."""
    (tmp_path / "c").mkdir()
    c = LocalCluster(agents=0, workdir=str(tmp_path / "c"))
    shared = tmp_path / "volunteer"
    with c:
        spawn_agent(c, "first", "--state-dir", str(shared))
        first = joined_id(c, "first")
        spawn_agent(c, "second", "--state-dir", str(shared))
        second = joined_id(c, "second")
        assert first != second
        key = (shared / "agent_key.pem").read_bytes()
        assert stat.S_IMODE((shared / "agent_key.pem").stat().st_mode) == 0o600
        assert {(shared / "agent_id").read_text().strip(), (shared / "agent_id.2").read_text().strip()} == \
            {first, second}
        with c.client() as cl:
            wait_for(lambda: {first, second} <= {a.agent_id for a in cl.status().agents if a.state == "ready"},
                     30, "both agents ready")
        for name in ("first", "second"):
            c.kill_agent(name, signal.SIGTERM)
            assert c.agents[name].wait(30) == 0
        spawn_agent(c, "again", "--state-dir", str(shared))
        assert joined_id(c, "again") == (shared / "agent_id").read_text().strip()
        assert (shared / "agent_key.pem").read_bytes() == key


def test_a_squatter_cannot_take_an_id_after_a_coordinator_restart(tmp_path):
    c = LocalCluster(agents=1, slots=1, workdir=str(tmp_path))
    with c:
        key = (c.agent_state("agent1") / "agent_key.pem").read_bytes()
        c.kill_agent("agent1", signal.SIGTERM)  # the honest agent is away while the coordinator restarts
        assert c.agents["agent1"].wait(30) == 0
        restart_coordinator(c)
        squatter = spawn_agent(c, "squatter", "--id", "agent1", "--state-dir", str(tmp_path / "squatter"))
        try:
            rc = squatter.wait(30)
        except subprocess.TimeoutExpired:
            rc = None
        log = c.log("agent-squatter.log")
        assert rc == 2, log  # today's code: the squatter joins as agent1
        assert "agent_id_taken" in log and "belongs to another agent" in log, log
        c.start_agent("agent1")  # the honest one comes back: same state directory, same key
        c.wait_agents_ready(["agent1"])
        assert (c.agent_state("agent1") / "agent_key.pem").read_bytes() == key
        with c.client() as cl:
            wait_for(lambda: cl.envelope("math.compute", {"a": secrets.randbelow(10**6), "b": 1}).executed_by
                     == "agent1", 30, "agent1 to serve a call")
        assert c.agents["agent1"].poll() is None


def test_forged_and_provoked_refusals_do_not_stop_the_agent(tmp_path):
    """Through an on-path relay: a forged plaintext refusal, one signed by another key, a real one
    provoked by altering the agent's proof, and one injected mid-session. Each ends that attempt
    only; the agent comes back and serves (today's code exits 2 at the first). The coordinator runs
    with --insecure so that a relay can sit on the path at all (TLS pinned to the token's key keeps
    it out otherwise): the link's own handshake must hold without TLS."""
    c = LocalCluster(agents=0, workdir=str(tmp_path), coordinator_args=["--insecure"])
    with c:
        relay_addr = f"127.0.0.1:{free_port()}"
        out = open(c.dir / "relay.log", "ab")
        c._logs.append(out)
        relay = subprocess.Popen([sys.executable, str(RELAY), "--listen", relay_addr, "--upstream", c.addr,
                                  "--plan", "forge,sign,tamper,inject", "--inject-after", "1.0"],
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        c.agents["relay"] = relay  # stopped with the cluster
        wait_for(lambda: "relay on" in c.log("relay.log") or relay.poll() is not None, 20, "the relay")
        assert relay.poll() is None, c.log("relay.log")
        agent = spawn_agent(c, "honest", "--id", "honest", "--state-dir", str(c.agent_state("honest")),
                            coordinator=relay_addr)
        wait_for(lambda: "attack 4 inject" in c.log("relay.log") or agent.poll() is not None, 60,
                 "the relay's four attacks")
        log = lambda: c.log("agent-honest.log")  # noqa: E731
        assert agent.poll() is None, log()
        joined_id(c, "honest", nth=2)  # in before the injection, and back after it
        c.wait_agents_ready(["honest"])
        with c.client() as cl:
            wait_for(lambda: cl.envelope("math.compute", {"a": secrets.randbelow(10**6), "b": 2}).executed_by
                     == "honest", 30, "the agent to serve a call through the relay")
        relay_log = c.log("relay.log")
        for n, what in enumerate(("forge", "sign", "tamper", "inject"), 1):
            assert f"attack {n} {what}" in relay_log, relay_log
        assert log().count("ignored an unauthenticated refusal") >= 4, log()
        assert "join secret not accepted" in c.log("coordinator.log")  # the provoked refusal was real...
        assert agent.poll() is None  # ...and still did not stop the agent
