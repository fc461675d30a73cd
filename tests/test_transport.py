"""The client transport: TLS on both ports by default, keys pinned before anything is sent.

A fake coordinator (tests/data/fake_coordinator.py, a real process) sits on the address the CLI,
the Python Client and an agent are given, with a certificate of its own or no TLS at all: it
must receive no credential (nor anything else). The real coordinator serves TLS on gRPC and
HTTP, bound to its identity; clients pin it from the state directory, a fingerprint, or a join
token; an operator's own certificate (--tls-cert/--tls-key, here from a private CA) and
--insecure work as documented.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from microswarm.coordinator.state import StateDir
from microswarm.coordinator.tls import prepare
from microcores import _tls
from microcores.client import Client
from microswarm.cluster import LocalCluster, free_port, wait_for
from microswarm.protos import microswarm_pb2 as pb
from microswarm.protos import microswarm_pb2_grpc as pbg

DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "microswarm.cli"]
SERVICE = """
from pydantic import BaseModel
from microcores import MicroCore

class In(BaseModel):
    n: int

class Out(BaseModel):
    n: int

class Echo(MicroCore[In, Out]):
    name = "tls.echo"
    version = "1"
    pure = True

    def process(self, data: In) -> Out:
        return Out(n=data.n)
"""


@pytest.fixture
def operator_state(tmp_path: Path) -> StateDir:
    """A coordinator's state directory (identity, admin credential, certificate, join token) whose
    coordinator is not running: only the fake answers."""
    state = StateDir(tmp_path / "state")
    state.admin_token(create=True)
    prepare(state.path, state.identity, ["127.0.0.1:0"])
    return state


def start_fake(tmp_path: Path, plain: bool) -> tuple[subprocess.Popen[bytes], str, Path]:
    addr, log = f"127.0.0.1:{free_port()}", tmp_path / f"fake-{'plain' if plain else 'tls'}.jsonl"
    out = open(tmp_path / "fake.out", "ab")
    p = subprocess.Popen([sys.executable, str(DATA / "fake_coordinator.py"), "--listen", addr, "--log", str(log),
                          *(["--plain"] if plain else [])], stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True)
    wait_for(lambda: "fake coordinator on" in (tmp_path / "fake.out").read_text() or p.poll() is not None, 20,
             "the fake coordinator")
    assert p.poll() is None, (tmp_path / "fake.out").read_text()
    return p, addr, log


def run_cli(state: StateDir, addr: str, *args: str, extra_env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    import os
    env = {**os.environ, "MICROSWARM_STATE_DIR": str(state.path), "MICROSWARM_COORDINATOR": addr, **(extra_env or {})}
    env.pop("MICROSWARM_INSECURE", None)
    env.pop("MICROSWARM_FINGERPRINT", None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("plain", [False, True], ids=["fake-with-its-own-key", "fake-without-tls"])
def test_a_fake_coordinator_receives_no_credential(tmp_path, operator_state, plain):
    fake, addr, log = start_fake(tmp_path, plain)
    try:
        svc = tmp_path / "echo_service.py"
        svc.write_text(SERVICE)
        fp = operator_state.fingerprint.hex()
        attempts = {
            "publish": run_cli(operator_state, addr, "publish", str(svc), "--wait", "0"),
            "clients create": run_cli(operator_state, addr, "clients", "create", "x"),
            "call": run_cli(operator_state, addr, "call", "math.compute", '{"a": 1, "b": 2}'),
            "status": run_cli(operator_state, addr, "status"),
            # another machine: no state dir, the operator's fingerprint and a client's secret
            "call --fingerprint": run_cli(StateDir(tmp_path / "elsewhere"), addr, "call", "math.compute", "{}",
                                          "--fingerprint", fp,
                                          extra_env={"MICROSWARM_CLIENT_ID": "msc_x", "MICROSWARM_CLIENT_SECRET": "s"}),
            "agent": run_cli(operator_state, addr, "agent", "start", "--coordinator", addr, "--token",
                             operator_state.token(), "--state-dir", str(tmp_path / "agent"), "--slots", "1"),
        }
        for what, r in attempts.items():
            text = r.stdout + r.stderr
            assert r.returncode != 0, f"{what} succeeded against the fake:\n{text}"
            assert "untrusted_coordinator" in text or "did not prove" in text or "did not complete a TLS" in text \
                or "pins" in text, f"{what}: no clear word on the coordinator's key:\n{text[-1500:]}"
        with pytest.raises(_tls.UntrustedCoordinator):
            with Client(addr, state_dir=operator_state.path) as c:  # the Python client, the admin credential
                c.call("math.compute", {"a": 1, "b": 2})
        with pytest.raises(_tls.UntrustedCoordinator):
            with Client(addr, client_id="msc_x", client_secret="secret", fingerprint=fp,
                        state_dir=tmp_path / "nothing") as c:
                c.call("math.compute", {"a": 1, "b": 2})
        got = [json.loads(line) for line in log.read_text().splitlines()]
        assert got == [], f"the fake coordinator received {got}"
        assert operator_state.admin_token() not in log.read_text()
    finally:
        fake.kill()
        fake.wait(10)


def test_tls_on_both_ports_with_pinning(tmp_path):
    with LocalCluster(agents=1, slots=1, http=True, workdir=str(tmp_path)) as c:
        cert = x509.load_pem_x509_certificate(c.cert_path.read_bytes())
        state = StateDir(c.state)
        assert _tls.bound_identity(cert) == state.public_key  # bound to the key join tokens pin
        # gRPC: plaintext is not spoken at all
        with grpc.insecure_channel(c.addr) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pbg.CoordinatorStub(ch).Status(pb.StatusRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # HTTP: plaintext gets no answer; https verified against coordinator.crt alone, name checked
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{c.http_port}/healthz", timeout=5).read()
        with c.urlopen(c.http_url + "/healthz") as r:
            assert json.loads(r.read())["status"] == "ok"
        with pytest.raises(urllib.error.URLError) as ue:  # the system's CAs do not vouch for it
            urllib.request.urlopen(c.http_url + "/healthz", timeout=5, context=ssl.create_default_context())
        assert "CERTIFICATE_VERIFY_FAILED" in str(ue.value)
        # pinned by fingerprint from a machine without the state directory
        cred = c.create_client("remote", "math.*")
        far = tmp_path / "far"
        with Client(c.addr, client_id=cred["client_id"], client_secret=cred["client_secret"],
                    fingerprint=c.fingerprint(), state_dir=far) as cl:
            assert cl.call("math.compute", {"a": 6, "b": 7, "op": "mul"}) == {"result": 42.0}
        with pytest.raises(_tls.UntrustedCoordinator, match="presented key"):
            with Client(c.addr, client_id=cred["client_id"], client_secret=cred["client_secret"],
                        fingerprint="ab" * 32, state_dir=far) as cl:
                cl.call("math.compute", {"a": 1, "b": 1})
        with pytest.raises(_tls.UntrustedCoordinator, match=c.fingerprint()):  # nothing pins: says what it saw
            with Client(c.addr, client_id=cred["client_id"], client_secret=cred["client_secret"],
                        state_dir=far) as cl:
                cl.call("math.compute", {"a": 1, "b": 1})
        r = subprocess.run([*CLI, "status", "--fingerprint", "not-hex"], capture_output=True, text=True, timeout=60,
                           env={**c.env(), "MICROSWARM_STATE_DIR": str(far)})
        assert r.returncode != 0 and "fingerprint" in r.stderr


def _private_ca(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A private CA and a leaf for 127.0.0.1 it signed: (ca.pem, leaf.pem, leaf.key)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test operator CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp_path / "ca.pem", tmp_path / "leaf.pem", tmp_path / "leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return paths


def test_an_operators_own_certificate_serves_clients_and_agents(tmp_path, monkeypatch):
    ca, leaf, key = _private_ca(tmp_path)
    monkeypatch.setenv("MICROSWARM_CACERT", str(ca))  # clients of this test process trust the private CA
    (tmp_path / "c").mkdir()
    c = LocalCluster(agents=1, slots=1, http=True, workdir=str(tmp_path / "c"),
                     coordinator_args=["--tls-cert", str(leaf), "--tls-key", str(key)],
                     env={"MICROSWARM_CACERT": str(ca)})
    with c:
        assert c.cert_path.read_bytes() == leaf.read_bytes()  # what clients trust: the operator's chain
        with c.client() as cl:  # pinned from the state dir; the agent joined through its CA + the link's handshake
            env = cl.envelope("math.compute", {"a": 2, "b": 21, "op": "mul"})
            assert env.ok and env.result == {"result": 42.0}
        ctx = ssl.create_default_context(cafile=str(ca))  # a browser-like client: CA and host name checked
        with urllib.request.urlopen(c.http_url + "/healthz", timeout=10, context=ctx) as r:
            assert r.status == 200
    bad = subprocess.run([*CLI, "coordinator", "start", "--listen", f"127.0.0.1:{free_port()}", "--state-dir",
                          str(tmp_path / "bad"), "--tls-cert", str(leaf), "--tls-key", str(tmp_path / "c" / "state" /
                                                                                          "identity.pem")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--tls-key" in bad.stderr and "not" in bad.stderr, bad.stderr


def test_insecure_is_plaintext_and_clients_must_opt_in(tmp_path):
    with LocalCluster(agents=1, slots=1, workdir=str(tmp_path), coordinator_args=["--insecure"]) as c:
        assert not c.cert_path.exists()  # nothing for clients to pin that is not served
        assert "TLS is OFF" in c.log("coordinator.log")
        with c.client() as cl:  # insecure=True: the cluster's clients opted in
            assert cl.call("math.compute", {"a": 1, "b": 2, "op": "add"}) == {"result": 3.0}
        with pytest.raises(_tls.UntrustedCoordinator, match="MICROSWARM_INSECURE"):
            with Client(c.addr, state_dir=c.state, insecure=False) as cl:
                cl.call("math.compute", {"a": 1, "b": 2})
    with socket.socket() as s:  # (the port is closed again after the cluster stops)
        assert s.connect_ex(("127.0.0.1", c.port)) != 0


def test_a_stalled_tls_handshake_on_the_grpc_port_is_dropped(tmp_path):
    """A connection that starts a ClientHello and stalls holds a descriptor 15 s, not gRPC's default
    120 s (the HTTP port's bound is in test_gateway_abuse.py)."""
    with LocalCluster(agents=0, workdir=str(tmp_path)) as c:
        socks = [socket.create_connection(("127.0.0.1", c.port), timeout=40) for _ in range(20)]
        for s in socks:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        t0 = time.monotonic()
        for s in socks:
            assert s.recv(100) == b""  # closed by the coordinator (a timeout would raise)
        took = time.monotonic() - t0
        with c.client() as cl:  # and the port still serves
            assert cl.status().coordinator_id
        for s in socks:
            s.close()
    assert 10 < took < 25, took
