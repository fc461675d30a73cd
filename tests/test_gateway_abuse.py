"""A gateway that holds under abuse (issue 11), with real processes: slow headers and half-open
requests are closed within their timeouts while honest requests keep working; chunked oversized
bodies are refused early at bounded memory; token requests are rate-limited (429, gRPC
RESOURCE_EXHAUSTED); a requested scope must be covered as a pattern; the coordinator raises its
open-file limit; the admin credential is kept in memory and re-read when its file changes."""
from __future__ import annotations

import base64
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from microswarm.coordinator.auth import TOKEN_LIMIT_PER_CLIENT
from microswarm.coordinator.gateway import FORM_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_FORM
from microcores import _tls
from microcores.client import Client
from microcores.errors import Unauthorized
from microswarm.cluster import LocalCluster, wait_for
from microswarm.protos import microswarm_pb2 as pb
from microswarm.protos import microswarm_pb2_grpc as pbg

CLI = [sys.executable, "-m", "microswarm.cli"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = LocalCluster(agents=0, http=True, workdir=str(tmp_path_factory.mktemp("abuse")))
    with c:
        yield c


def post_form(c: LocalCluster, url: str, form: dict[str, str], cred: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    basic = base64.b64encode(f"{cred['client_id']}:{cred['client_secret']}".encode()).decode()
    req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST", headers={
        "Authorization": "Basic " + basic, "Content-Type": "application/x-www-form-urlencoded"})
    try:
        with c.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, dict(e.headers), json.loads(body) if body else None


def tls_channel(c: LocalCluster) -> grpc.Channel:
    """A gRPC channel to the coordinator that trusts its certificate from the state directory."""
    trust = _tls.from_state_dir(c.state)
    assert trust is not None, f"no coordinator certificate in {c.state}"
    return trust.channel(c.addr)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def healthz(c: LocalCluster) -> float:
    """Seconds an honest request takes (it must answer)."""
    t0 = time.monotonic()
    with c.urlopen(c.http_url + "/healthz", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    return time.monotonic() - t0


def closed(s: socket.socket) -> bool:
    """The server closed (or reset) this connection; whatever it answered first is read and dropped."""
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):  # nothing yet: still open
        return False
    except OSError:
        return True


def connect(c: LocalCluster) -> socket.socket:
    """A connection to the gateway over TLS, as it serves by default: the handshake is completed here
    (trusting exactly the coordinator's certificate), so what a test sends next is HTTP inside it."""
    raw = socket.create_connection(("127.0.0.1", c.http_port), timeout=10)
    ctx = c.ssl_context()
    assert ctx is not None, "the cluster serves TLS"
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_slow_headers_and_half_open_requests_are_closed_while_honest_requests_work(cluster):
    c = cluster
    cred = c.create_client("halfopen")
    status, _, tok = post_form(c, c.http_url + "/oauth/token", {"grant_type": "client_credentials"}, cred)
    assert status == 200
    host = f"Host: 127.0.0.1:{c.http_port}\r\n"
    slow, half_form, half_call = [], [], []
    t0 = time.monotonic()
    for _ in range(60):  # a request line and part of the headers, then a trickle that never ends them
        s = connect(c)
        s.sendall(b"GET /healthz HTTP/1.1\r\n" + host.encode() + b"X-Slow: ")
        slow.append(s)
    for _ in range(30):  # whole headers, a body announced and never sent whole
        s = connect(c)
        s.sendall(b"POST /oauth/token HTTP/1.1\r\n" + host.encode() + b"Content-Type: application/x-www-form-urlencoded\r\n"
                  b"Content-Length: 200\r\n\r\ngrant_type=cl")
        half_form.append(s)
        s = connect(c)
        s.sendall(b"POST /v1/math/compute HTTP/1.1\r\n" + host.encode() + b"Content-Type: application/json\r\n"
                  + f"Authorization: Bearer {tok['access_token']}\r\n".encode() + b"Content-Length: 5000\r\n\r\n{\"a\": 1")
        half_call.append(s)
    stalled_tls = []
    for _ in range(30):  # the start of a TLS ClientHello, and nothing more: the handshake never ends
        s = socket.create_connection(("127.0.0.1", c.http_port), timeout=10)
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        stalled_tls.append(s)
    honest = []
    with c.client() as op:
        while time.monotonic() - t0 < HEADER_TIMEOUT_S + 6:
            for s in slow:  # keep trickling: bytes that arrive do not extend the header deadline
                try:
                    s.sendall(b"x")
                except OSError:
                    pass
            honest.append(healthz(c))
            assert op.envelope("math.compute", {"a": 2, "b": 3}).status == "ok"
            if all(closed(s) for s in slow + half_form + half_call + stalled_tls):
                break
            time.sleep(1.0)
        took = time.monotonic() - t0
    assert all(closed(s) for s in half_form), "half-open token requests still held"
    assert all(closed(s) for s in half_call), "half-open calls still held"
    assert all(closed(s) for s in slow), "slow headers still held"
    assert all(closed(s) for s in stalled_tls), "stalled TLS handshakes still held"
    assert took < HEADER_TIMEOUT_S + 6, took
    assert max(honest) < 2.0, honest  # honest requests answered all along
    for s in slow + half_form + half_call:
        s.close()
    print(f"90 half-open, 60 slow-header and 30 stalled-handshake connections closed after {took:.1f} s (header timeout "
          f"{HEADER_TIMEOUT_S:g} s, form {FORM_TIMEOUT_S:g} s); honest /healthz max {max(honest) * 1000:.0f} ms")


def test_a_half_open_token_request_gets_408(cluster):
    c = cluster
    s = connect(c)
    s.sendall("POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
              "Content-Length: 100\r\n\r\ngrant".encode())
    s.settimeout(FORM_TIMEOUT_S + 10)
    t0 = time.monotonic()
    answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert FORM_TIMEOUT_S - 1 < time.monotonic() - t0 < FORM_TIMEOUT_S + 5
    s.close()


def _chunked_flood(c: LocalCluster, path: str, total: int, out: list[tuple[str, float]]) -> None:
    """POST `total` bytes chunked (no Content-Length); what the server answered, and how many MiB went."""
    s = connect(c)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
              "Transfer-Encoding: chunked\r\n\r\n".encode())
    piece = b"a" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    sent = 0
    try:
        while sent < total:
            s.sendall(chunk)
            sent += len(piece)
        s.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server closed on us: what we want
    s.settimeout(10)
    try:
        answer = s.recv(4096).decode(errors="replace")
    except OSError:
        answer = ""
    s.close()
    out.append((answer.split("\r\n", 1)[0], sent / (1 << 20)))


def test_chunked_oversized_bodies_are_refused_early_at_bounded_memory(cluster):
    c = cluster
    pid = c.coordinator.pid
    before = rss_mib(pid)
    out: list[tuple[str, float]] = []
    peak = [before]
    threads = [threading.Thread(target=_chunked_flood, args=(c, "/oauth/token", 60 << 20, out)) for _ in range(6)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak.append(rss_mib(pid))
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(out) == 6
    for status, mib in out:  # a 413, or a reset that overtook it (the server closes while we still send)
        assert status.startswith("HTTP/1.1 413") or status == "", out
        assert mib < 32, out  # refused long before 60 MiB went (the socket buffers hold some)
    assert any(status.startswith("HTTP/1.1 413") for status, _ in out), out
    grew = max(peak) - before
    assert grew < 40, f"coordinator RSS grew {grew:.0f} MiB"
    assert healthz(c) < 2.0
    print(f"6 chunked 60 MiB bodies to /oauth/token: 413 after {max(m for _, m in out):.1f} MiB sent at most; "
          f"coordinator RSS {before:.0f} -> peak {max(peak):.0f} MiB (limit {MAX_FORM} bytes)")


def test_scope_widening_is_refused_over_http_and_grpc(cluster):
    c = cluster
    cred = c.create_client("narrow", "math.[!c]*")
    url = c.http_url + "/oauth/token"
    status, _, err = post_form(c, url, {"grant_type": "client_credentials", "scope": "math.*"}, cred)
    assert status == 400 and err["error"] == "invalid_scope" and "not covered" in err["error_description"]
    status, _, ok = post_form(c, url, {"grant_type": "client_credentials", "scope": "math.add"}, cred)
    assert status == 200 and ok["scope"] == "math.add"
    with tls_channel(c) as ch:
        stub = pbg.CoordinatorStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Token(pb.TokenRequest(grant_type="client_credentials", client_id=cred["client_id"],
                                       client_secret=cred["client_secret"], scope="math.*"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid_scope" in e.value.details()


def test_token_requests_are_rate_limited_with_429_and_resource_exhausted(cluster):
    c = cluster
    burst = int(TOKEN_LIMIT_PER_CLIENT[1])
    cred = c.create_client("burst")
    url = c.http_url + "/oauth/token"
    answers = [post_form(c, url, {"grant_type": "client_credentials"}, cred) for _ in range(burst + 5)]
    codes = [a[0] for a in answers]
    assert codes[:burst - 2].count(200) == burst - 2 and codes[-1] == 429, codes
    status, headers, err = answers[-1]
    assert err["error"] == "rate_limited" and "retry in" in err["error_description"]
    assert int(headers["Retry-After"]) >= 1
    other = c.create_client("calm")  # another client is not held back by this one
    assert post_form(c, url, {"grant_type": "client_credentials"}, other)[0] == 200

    cred = c.create_client("grpcburst")
    with tls_channel(c) as ch:
        stub = pbg.CoordinatorStub(ch)
        req = pb.TokenRequest(grant_type="client_credentials", client_id=cred["client_id"],
                              client_secret=cred["client_secret"])
        codes = []
        for _ in range(burst + 5):
            try:
                stub.Token(req, timeout=10)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                last = exc
        assert codes[-1] == "RESOURCE_EXHAUSTED", codes
        assert "rate_limited" in last.details() and "retry in" in last.details()
    with c.client() as op:  # the operator's own tools are not held back
        assert op.envelope("math.compute", {"a": 1, "b": 1}).status == "ok"


def test_the_admin_credential_is_kept_in_memory_and_reloaded_when_its_file_changes(cluster):
    c = cluster
    path = c.state / "admin.token"
    old = path.read_text().strip()
    new = "rotated-" + os.urandom(16).hex()
    try:
        path.write_text(new)
        with tls_channel(c) as ch:
            stub = pbg.CoordinatorStub(ch)

            def works(cred: str) -> bool:
                try:
                    stub.Status(pb.StatusRequest(), metadata=[("authorization", f"Admin {cred}")], timeout=5)
                    return True
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    return False
            wait_for(lambda: works(new), 5, "the new admin credential to be taken")
            assert not works(old)
            path.unlink()  # a missing file keeps the one in memory
            time.sleep(1.2)
            assert works(new)
    finally:
        path.write_text(old)

        def back() -> bool:
            try:
                with Client(c.addr, state_dir=str(c.state)) as op:
                    return op.status(timeout=5) is not None
            except Unauthorized:
                return False
        wait_for(back, 5, "the old credential back")


def test_the_coordinator_raises_its_open_files_limit_to_the_hard_limit(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    if low >= hard or hard == resource.RLIM_INFINITY:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = open(tmp_path / "coordinator.log", "w+b")
    p = subprocess.Popen([*CLI, "coordinator", "start", "--listen", f"127.0.0.1:{port}", "--state-dir",
                          str(tmp_path / "state"), "--no-advertise", "--local-slots", "1"],
                         stdout=log, stderr=subprocess.STDOUT, preexec_fn=lower)
    try:
        wait_for(lambda: b"listening" in (tmp_path / "coordinator.log").read_bytes() or p.poll() is not None, 60,
                 "the coordinator to start")
        limits = Path(f"/proc/{p.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        got_soft, got_hard = line.split()[3:5]
        assert got_soft == got_hard == str(hard), line
        assert f"open files limit raised from {low} to" in (tmp_path / "coordinator.log").read_text()
    finally:
        p.terminate()
        p.wait(30)
        log.close()


def test_open_metrics_carry_no_client_ids_nor_addresses(cluster):
    c = cluster
    cred = c.create_client("metered")
    with c.client(client_id=cred["client_id"], client_secret=cred["client_secret"]) as cl:
        assert cl.envelope("math.compute", {"a": 5, "b": 6}).status == "ok"
    with c.urlopen(c.http_url + "/metrics", timeout=10) as r:  # no token: open by default
        body = r.read().decode()
    assert "microswarm_calls" in body
    assert cred["client_id"] not in body and "msc_" not in body and "127.0.0.1" not in body
