"""Per-volunteer join tokens (caps, listing, revocation) and who sees volunteers in `status`.

Unit tests of coordinator/volunteers.py, then real processes driven through the CLI the way an
operator's script would: `coordinator token --name`, `coordinator tokens list|revoke`, `status`.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from microswarm.coordinator.state import StateDir
from microswarm.coordinator.volunteers import (KEYS_FILE, SECRETS_FILE, Denied, KeyBindings, Volunteers, load_tokens, mint,
                                    revoke)
from microcores._secure import JoinToken
from microcores.client import Client
from microswarm.cluster import LocalCluster, wait_for

CLI = [sys.executable, "-m", "microswarm.cli"]


def cli(c: LocalCluster, *args: str, timeout: float = 60, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**c.env(), **(env or {})},
                          timeout=timeout)


# ---------------------------------------------------------------- the files

def test_old_join_secret_files_load_and_named_tokens_keep_them(tmp_path):
    st = StateDir(tmp_path)
    old = secrets.token_bytes(32)
    (tmp_path / SECRETS_FILE).write_text(json.dumps({"secrets": [old.hex()]}))  # written before named tokens
    assert st.join_secrets() == [old] and JoinToken.parse(st.token()).secret == old
    text, tok, what = st.volunteer_token("alice", 2, 3)
    assert what == "minted" and (tok.max_agents, tok.max_slots) == (2, 3) and JoinToken.parse(text).secret == tok.secret
    assert st.volunteer_token("alice")[:1] == (text,)  # the same token again
    assert st.volunteer_token("alice", max_slots=4)[2] == "updated"
    data = json.loads((tmp_path / SECRETS_FILE).read_text())
    assert data["secrets"] == [old.hex()]  # what an older coordinator reads is unchanged
    assert stat.S_IMODE((tmp_path / SECRETS_FILE).stat().st_mode) == 0o600
    assert JoinToken.parse(st.token()).secret == old  # the shared token is still the shared one
    assert set(st.join_secrets()) == {old, tok.secret}
    revoked, now = revoke(tmp_path / SECRETS_FILE, "alice")
    assert now and revoked.revoked and st.join_secrets() == [old]
    assert [t.describe()["revoked"] is not None for t in load_tokens(tmp_path / SECRETS_FILE) if t.name] == [True]
    assert "secret" not in revoked.describe() and tok.secret.hex() not in json.dumps(revoked.describe())
    with pytest.raises(KeyError):
        revoke(tmp_path / SECRETS_FILE, "bob")
    with pytest.raises(ValueError):
        mint(tmp_path / SECRETS_FILE, "../evil")
    fresh, _, what = st.volunteer_token("alice")  # a revoked name gets a new secret
    assert what == "minted" and fresh != text


def test_caps_and_bindings(tmp_path):
    StateDir(tmp_path).volunteer_token("bob", 1, 3)
    v = Volunteers(tmp_path)
    v.tokens.load()
    (bob,) = [t for t in v.tokens.tokens if t.name == "bob"]
    k1, k2 = secrets.token_bytes(32), secrets.token_bytes(32)
    assert v.admit(bob, "b1", k1, 8, []) == 3  # clamped to what the token allows
    with pytest.raises(Denied) as e:
        v.admit(bob, "b2", k2, 1, [SimpleNamespace(slots=3)])
    assert e.value.code == "token_max_agents"
    with pytest.raises(Denied) as e:
        v.admit(bob, "b1", k2, 1, [])  # another key under a bound id
    assert e.value.code == "agent_id_taken"
    assert v.admit(bob, "b1", k1, 2, []) == 2  # its own key: fine
    assert KeyBindings(tmp_path / KEYS_FILE).owner("b1") == k1  # kept on disk, 0600
    assert stat.S_IMODE((tmp_path / KEYS_FILE).stat().st_mode) == 0o600
    for i in range(2, 17):  # one token binds a bounded number of ids (16 for --max-agents 1)
        v.admit(bob, f"b{i}", k1, 1, [])
    with pytest.raises(Denied) as e:
        v.admit(bob, "b17", k1, 1, [])
    assert e.value.code == "token_max_ids"
    for aid in ("b1", "b2"):  # two agents whose state was thrown away long ago; b1 is connected now
        v.bindings.agents[aid]["seen"] -= 30 * 86400
    v.admit(bob, "b17", k2, 1, [], connected={"b1": object()})  # the stale one not connected gives way
    assert v.bindings.owner("b2") is None and v.bindings.owner("b1") == k1 and v.bindings.owner("b17") == k2
    (tmp_path / KEYS_FILE).write_text("{damaged")
    with pytest.raises(ValueError, match="damaged"):  # never silently forget who owns an id
        Volunteers(tmp_path)


# ---------------------------------------------------------------- real processes

def start_with(c: LocalCluster, name: str, token: str, slots: int) -> subprocess.Popen[bytes]:
    p = c._spawn(["agent", "start", "--coordinator", c.addr, "--token", token, "--id", name, "--slots", str(slots),
                  "--state-dir", str(c.agent_state(name))], f"agent-{name}.log")
    c.agents[name] = p
    return p


def status_json(c: LocalCluster, *extra: str, env: dict[str, str] | None = None) -> dict:
    r = cli(c, "status", "--json", *extra, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_token_caps_listing_and_revocation(tmp_path):
    c = LocalCluster(agents=1, slots=1, workdir=str(tmp_path))  # agent1, on the shared token
    with c:
        state = str(c.state)
        r = cli(c, "coordinator", "token", "--state-dir", state, "--name", "alice", "--max-agents", "2",
                "--max-slots", "3")
        assert r.returncode == 0, r.stderr
        tok = r.stdout.strip().splitlines()[-1]
        assert tok.startswith("msw1.") and tok != c.token
        again = cli(c, "coordinator", "token", "--state-dir", state, "--name", "alice")
        assert again.stdout.strip().splitlines()[-1] == tok
        secret_hex = JoinToken.parse(tok).secret.hex()
        for args in ((), ("--json",)):
            listing = cli(c, "coordinator", "tokens", "list", "--state-dir", state, *args)
            assert listing.returncode == 0 and "alice" in listing.stdout, listing.stderr
            assert tok not in listing.stdout and secret_hex not in listing.stdout
        (row,) = json.loads(listing.stdout)
        assert (row["name"], row["max_agents"], row["max_slots"], row["revoked"]) == ("alice", 2, 3, None)

        start_with(c, "alice1", tok, 2)
        c.wait_agents_ready(["alice1"])
        start_with(c, "alice2", tok, 2)  # asks 2, gets what remains of 3
        c.wait_agents_ready(["alice2"])
        third = start_with(c, "alice3", tok, 1)
        wait_for(lambda: "token_max_agents" in c.log("agent-alice3.log"), 30, "the third agent to be refused")
        agents = {a["agent_id"]: a for a in status_json(c)["agents"]}
        assert (agents["alice1"]["slots"], agents["alice1"]["slots_asked"]) == (2, 2)
        assert (agents["alice2"]["slots"], agents["alice2"]["slots_asked"]) == (1, 2)
        assert agents["alice1"]["token_name"] == "alice" and agents["agent1"]["token_name"] == ""
        assert "alice3" not in agents and third.poll() is None  # it waits to retry: not a reason to stop
        assert "joined coordinator" in c.log("agent-alice2.log") and "of 2 asked" in c.log("agent-alice2.log")

        t0 = time.monotonic()
        r = cli(c, "coordinator", "tokens", "revoke", "alice", "--state-dir", state)
        assert r.returncode == 0 and "revoked" in r.stdout, r.stderr
        for name in ("alice1", "alice2"):  # told (sealed), they stop for good
            assert c.agents[name].wait(10) == 2, c.log(f"agent-{name}.log")
            assert "token_revoked" in c.log(f"agent-{name}.log")
        with c.client() as cl:
            wait_for(lambda: not {"alice1", "alice2"} & {a.agent_id for a in cl.status().agents}, 5,
                     "alice's agents to leave the status")
            took = time.monotonic() - t0
            assert took < 5, took  # the CLI's start-up included; the coordinator sees it within 0.5 s
            back = start_with(c, "alice1", tok, 1)  # reconnection refused
            assert back.wait(30) == 2 and "token_revoked" in c.log("agent-alice1.log")
            assert c.agents["agent1"].poll() is None
            env = cl.envelope("math.compute", {"a": secrets.randbelow(10**6), "b": 3})
            assert env.ok, env.error
            wait_for(lambda: cl.envelope("math.compute", {"a": secrets.randbelow(10**6), "b": 4}).executed_by
                     == "agent1", 30, "the other volunteer's agent to keep serving")
        listing = json.loads(cli(c, "coordinator", "tokens", "list", "--state-dir", state, "--json").stdout)
        assert listing[0]["revoked"] is not None
        c.kill_agent("alice3", signal.SIGTERM)


def test_status_shows_volunteers_only_to_the_operator(tmp_path):
    """Status and CacheStats: refused to anonymous callers and to clients without the `status`
    scope; a `status`-scoped client sees pseudonyms; the operator sees everything."""
    from microcores.errors import Unauthorized

    c = LocalCluster(agents=2, slots=1, workdir=str(tmp_path))
    with c, c.client() as op:
        for i in range(4):
            op.envelope("math.compute", {"a": secrets.randbelow(10**6), "b": i})
        full = op.status()
        assert not full.redacted and {a.agent_id for a in full.agents} == {"agent1", "agent2"}
        assert all(a.address for a in full.agents)
        assert "hits" in op.cache_stats()

        with Client(c.addr, state_dir=str(tmp_path / "not-the-state-dir"), fingerprint=c.fingerprint()) as anonymous:
            for look in (anonymous.status, anonymous.cache_stats):
                with pytest.raises(Unauthorized) as e:
                    look()
                assert "scope 'status'" in e.value.message and "admin credential" in e.value.message
        math = json.loads(cli(c, "clients", "create", "mathonly", "--scope", "math.*", "--json").stdout)
        with c.client(client_id=math["client_id"], client_secret=math["client_secret"]) as m:
            assert m.envelope("math.compute", {"a": 1, "b": 2}).status == "ok"
            with pytest.raises(Unauthorized) as e:
                m.status()
            assert "'status'" in e.value.message and "math.*" in e.value.message

        ids: set[str] = set()
        for scope in ("status", "*"):
            created = cli(c, "clients", "create", f"viewer{len(scope)}", "--scope", scope, "--json")
            assert created.returncode == 0, created.stderr
            viewer = json.loads(created.stdout)
            with c.client(client_id=viewer["client_id"], client_secret=viewer["client_secret"]) as who:
                st = who.status()
                assert "hits" in who.cache_stats()
            assert st.redacted
            ids = {a.agent_id for a in st.agents}
            assert len(ids) == 2 and not ids & {"agent1", "agent2"} and all(i.startswith("agent-") for i in ids)
            assert all(a.address == "" and a.token_name == "" for a in st.agents)
            assert sorted(sorted(a.packages) for a in st.agents) == sorted(sorted(a.packages) for a in full.agents)
            assert {a.state for a in st.agents} == {a.state for a in full.agents}
            ran = {x.executed_by for x in st.calls} - {"coordinator", "cache"}
            assert ran and ran <= ids and not ran & {"agent1", "agent2"}  # the same stable pseudonyms
        with c.client(client_id=viewer["client_id"], client_secret=viewer["client_secret"]) as again:
            assert {a.agent_id for a in again.status().agents} == ids  # stable across calls

        assert {a["agent_id"] for a in status_json(c)["agents"]} == {"agent1", "agent2"}  # the operator's CLI
        env = {"MICROSWARM_CLIENT_ID": viewer["client_id"], "MICROSWARM_CLIENT_SECRET": viewer["client_secret"]}
        hidden = status_json(c, "--state-dir", str(tmp_path / "nowhere"), "--fingerprint", c.fingerprint(), env=env)
        assert hidden["redacted"] is True and not {a["agent_id"] for a in hidden["agents"]} & {"agent1", "agent2"}
        assert all("packages" in a and "trust" in a and "state" in a for a in hidden["agents"])
        refused = cli(c, "status", "--json", "--state-dir", str(tmp_path / "nowhere"), "--fingerprint", c.fingerprint())
        assert refused.returncode != 0 and "status" in refused.stderr


def test_token_flags_are_checked(tmp_path):
    env = {"MICROSWARM_STATE_DIR": str(tmp_path)}
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "coordinator", *args, "--state-dir", str(tmp_path)], capture_output=True,
                              text=True, timeout=60, env={**os.environ, **env})
    assert run("token", "--max-agents", "2").returncode != 0  # caps belong to a named token
    assert run("token", "--name", "bad name").returncode != 0
    r = run("token", "--name", "carol", "--max-slots", "5")
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("msw1.")
    assert run("tokens", "revoke", "nobody").returncode != 0
    plain = run("token")
    assert plain.returncode == 0 and plain.stdout.strip().splitlines()[-1] != r.stdout.strip().splitlines()[-1]
    assert Path(tmp_path / SECRETS_FILE).exists()
