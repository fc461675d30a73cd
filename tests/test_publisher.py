"""Publisher keys: packages signed off the coordinator, checked by agents whose token carries the keys
(issue 11). Real coordinator and agent processes for the end-to-end part."""
from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microcores import _publisher
from microcores._package import Package, build, sign
from microcores._secure import JoinToken, fingerprint, public_bytes
from microcores.client import publish
from microcores.errors import MicroError, PackageError
from microcores.services import BUILTINS
from microswarm.cluster import LocalCluster, wait_for

DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "microswarm.cli"]


def keys_create(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "keys", "create", str(path)], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- keys and tokens

def test_keys_create_writes_a_private_and_a_public_key_and_never_overwrites(tmp_path):
    key = tmp_path / "keys" / "dev"
    r = keys_create(key)
    assert r.returncode == 0, r.stderr
    pub = tmp_path / "keys" / "dev.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    raw = _publisher.load_public(pub)
    assert r.stdout.strip() == fingerprint(raw).hex()
    assert public_bytes(_publisher.load_private(key)) == raw
    before = key.read_bytes()
    r = keys_create(key)
    assert r.returncode != 0 and "refusing to overwrite" in r.stderr
    assert key.read_bytes() == before
    key.unlink()  # the private key gone but its .pub still there: still refused
    r = keys_create(key)
    assert r.returncode != 0 and "dev.pub exists" in r.stderr.replace("\n", "") and not key.exists()


def test_msw1_tokens_parse_unchanged_and_msw2_round_trips():
    fp, secret = os.urandom(32), os.urandom(32)
    old = "msw1." + base64.urlsafe_b64encode(fp + secret).decode().rstrip("=")
    t = JoinToken.parse(old)
    assert (t.fingerprint, t.secret, t.publisher_keys) == (fp, secret, ())
    assert t.encode() == old  # no publisher keys: the same msw1 token as before
    keys = tuple(public_bytes(Ed25519PrivateKey.generate()) for _ in range(3))
    t2 = JoinToken(fp, secret, keys)
    text = t2.encode()
    assert text.startswith("msw2.") and JoinToken.parse(text) == t2
    assert JoinToken.parse(JoinToken(fp, secret, keys[:1]).encode()).publisher_keys == keys[:1]


@pytest.mark.parametrize("damage, words", [
    (lambda t: t[:-10], "expected 64 plus 32 per publisher key"),
    (lambda t: "msw2." + base64.urlsafe_b64encode(os.urandom(64)).decode().rstrip("="), "expected 64 plus 32"),
    (lambda t: t[:20] + "!!!" + t[23:], "not valid base64url"),
    (lambda t: "msw3." + t[5:], "not a microswarm join token"),
])
def test_damaged_msw2_tokens_are_clear_errors(damage, words):
    keys = (public_bytes(Ed25519PrivateKey.generate()),)
    text = JoinToken(os.urandom(32), os.urandom(32), keys).encode()
    with pytest.raises(ValueError, match=words):
        JoinToken.parse(damage(text))


def test_too_many_publisher_keys_is_refused():
    keys = tuple(public_bytes(Ed25519PrivateKey.generate()) for _ in range(_publisher_max() + 1))
    with pytest.raises(ValueError, match="publisher keys, at most"):
        JoinToken.parse(JoinToken(os.urandom(32), os.urandom(32), keys).encode())


def _publisher_max() -> int:
    from microcores._secure import MAX_PUBLISHER_KEYS
    return MAX_PUBLISHER_KEYS


# ---------------------------------------------------------------- the agent's check

def test_agent_check_needs_a_publisher_signature_but_accepts_its_own_builtins():
    from microcores import _package
    coordinator, publisher, other = (Ed25519PrivateKey.generate() for _ in range(3))
    keys = (public_bytes(publisher),)
    mod = _package.import_path(DATA / "versioned.py")[0]
    pkg = sign(build(_package.services_in(mod)[0]), coordinator)
    with pytest.raises(PackageError, match="not signed by a publisher key.*" + _publisher.short(keys[0])):
        _publisher.check_package(pkg, keys)
    forged = Package(pkg.manifest, pkg.archive, pkg.signature, _publisher.sign(pkg.manifest, other))
    with pytest.raises(PackageError, match="not one of the publisher keys accepted"):
        _publisher.check_package(forged, keys)
    good = Package(pkg.manifest, pkg.archive, pkg.signature, _publisher.sign(pkg.manifest, publisher))
    assert _publisher.check_package(good, keys) == "publisher " + _publisher.short(keys[0])
    # a signature over another manifest does not carry over
    moved = Package(pkg.manifest.replace(b'"version":"1"', b'"version":"9"'), pkg.archive, pkg.signature,
                    good.publisher_signature)
    with pytest.raises(PackageError):
        _publisher.check_package(moved, keys)
    builtin = sign(build(BUILTINS[0]), coordinator)
    assert _publisher.check_package(builtin, keys) == "builtin"


# ---------------------------------------------------------------- end to end

def _call_runs_on_agent(cluster: LocalCluster, service: str, data: dict) -> dict:
    with cluster.client() as c:
        env = c.envelope(service, data)
        assert env.ok, env.error
        return {"result": env.result, "executed_by": env.executed_by}


def test_publisher_keys_end_to_end(tmp_path):
    key, wrong = tmp_path / "dev", tmp_path / "wrong"
    assert keys_create(key).returncode == 0 and keys_create(wrong).returncode == 0
    pub = _publisher.load_public(tmp_path / "dev.pub")
    (tmp_path / "cluster").mkdir()
    c = LocalCluster(agents=1, slots=1, workdir=str(tmp_path / "cluster"),
                     coordinator_args=["--publisher-key", str(tmp_path / "dev.pub")])
    with c:  # the agent holds the built-ins: their digest is the one it computes from its own install
        assert c.token.startswith("msw2.") and JoinToken.parse(c.token).publisher_keys == (pub,)
        r = subprocess.run([*CLI, "coordinator", "token", "--state-dir", str(c.state)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and JoinToken.parse(r.stdout.strip()).publisher_keys == (pub,)
        assert _call_runs_on_agent(c, "math.compute", {"a": 1, "b": 2, "op": "add"})["executed_by"] == "agent1"

        with pytest.raises(MicroError, match="not signed by a publisher key.*" + _publisher.short(pub)):
            publish(str(DATA / "versioned.py"), coordinator=c.addr, state_dir=str(c.state))
        with pytest.raises(MicroError, match="not one of the publisher keys accepted.*" + _publisher.short(pub)):
            publish(str(DATA / "versioned.py"), coordinator=c.addr, state_dir=str(c.state), sign_with=str(wrong))
        r = subprocess.run([*CLI, "publish", str(DATA / "versioned.py"), "--sign-with", str(key), "--wait", "0"],
                           capture_output=True, text=True, env=c.env(), timeout=60)
        assert r.returncode == 0, r.stderr
        c.wait_agents_ready()
        out = _call_runs_on_agent(c, "tests.versioned", {"x": 5})
        assert out == {"result": {"y": 5, "version": "1"}, "executed_by": "agent1"}
        assert "is signed by publisher " + _publisher.short(pub) in c.log("agent-agent1.log")

        # A taken coordinator: the same state directory and identity, started without the keys. It
        # accepts an unsigned package; the agent, whose token carries the keys, refuses it.
        os.killpg(c.coordinator.pid, signal.SIGTERM)
        c.coordinator.wait(30)
        c.coordinator_args = []
        c.start_coordinator()
        assert c.token.startswith("msw1.")  # tokens minted now carry no keys
        v2 = tmp_path / "v2" / "versioned.py"
        v2.parent.mkdir()
        v2.write_text((DATA / "versioned.py").read_text().replace('version = "1"', 'version = "2"')
                      .replace("data.x * 1", "data.x * 666"))
        (rep,) = publish(str(v2), coordinator=c.addr, state_dir=str(c.state))
        assert rep.version == "2"
        log = lambda: c.log("agent-agent1.log")  # noqa: E731
        wait_for(lambda: "refused package tests.versioned@2" in log(), 60, "the agent to refuse the package")
        assert "not signed by a publisher key" in log()
        assert "the coordinator accepts packages from publisher keys [none]" in log()
        wait_for(lambda: "could not install tests.versioned@2" in c.log("coordinator.log"), 30,
                 "the coordinator to log the refusal (Installed ok=False)")
        with c.client() as cl:
            st = cl.status()
            agent = next(a for a in st.agents if a.agent_id == "agent1")
            assert "tests.versioned@2" not in agent.versions
            for i in range(5):  # never run there: the coordinator runs it itself
                env = cl.envelope("tests.versioned", {"x": 10 + i})
                assert env.ok and env.result["y"] == (10 + i) * 666 and env.executed_by != "agent1"
        assert not list((c.agent_state("agent1") / "agent-packages").glob(rep.digest + "*"))
        time.sleep(0.1)
