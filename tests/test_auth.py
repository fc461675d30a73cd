"""Clients and tokens: the Auth store in-process, then the whole token flow through real processes
(issue, use, expire, refresh, reuse detection, revoke) over HTTP and gRPC, and secrets kept out of
logs and listings."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from microswarm.coordinator.auth import ACCESS_TTL_S, OPERATOR, Auth, AuthError, narrows, parse_scopes, token_digest
from microswarm.cluster import LocalCluster, wait_for

CLI = [sys.executable, "-m", "microswarm.cli"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(tmp_path: Path, clock: Clock) -> Auth:
    return Auth(tmp_path, clock=clock)


# ---------------------------------------------------------------- clients

def test_a_client_secret_is_32_alphanumerics_shown_once_and_stored_hashed(auth, tmp_path):
    rec, secret = auth.create_client("reports", ["pegawai.*"])
    assert re.fullmatch(r"[A-Za-z0-9]{32}", secret)
    stored = (tmp_path / "clients.json").read_text()
    assert secret not in stored and rec.client_id in stored
    assert stat.S_IMODE((tmp_path / "clients.json").stat().st_mode) == 0o600
    assert rec.secret_hash not in secret.encode() and len(rec.salt) == 16
    assert auth.authenticate(rec.client_id, secret) is rec
    listed = json.dumps(auth.list_clients())
    assert secret not in listed and rec.secret_hash.hex() not in listed and rec.salt.hex() not in listed
    other, secret2 = auth.create_client("other")
    assert secret2 != secret and other.scopes == ("*",)


def test_wrong_secret_unknown_client_and_revoked_client_are_refused(auth):
    rec, secret = auth.create_client("a")
    for cid, s in ((rec.client_id, secret[:-1] + ("x" if secret[-1] != "x" else "y")), ("msc_nobody", secret)):
        with pytest.raises(AuthError) as e:
            auth.authenticate(cid, s)
        assert e.value.error == "invalid_client" and e.value.status == 401
    auth.revoke_client("a")
    with pytest.raises(AuthError, match="revoked"):
        auth.authenticate(rec.client_id, secret)


def test_client_names_are_unique_among_active_clients(auth):
    auth.create_client("a")
    with pytest.raises(ValueError, match="already exists"):
        auth.create_client("a")
    auth.revoke_client("a")
    auth.create_client("a")  # the name is free again


def test_scopes_are_glob_patterns_over_service_names():
    assert parse_scopes("pegawai.* math.compute") == ("pegawai.*", "math.compute")
    with pytest.raises(ValueError):
        parse_scopes("DROP TABLE")
    assert narrows("pegawai.data", ("pegawai.*",)) and narrows("pegawai.*", ("*",))
    assert not narrows("*", ("pegawai.*",)) and not narrows("dosen.data", ("pegawai.*",))


# ---------------------------------------------------------------- tokens

def test_client_credentials_answers_the_papers_token_shape(auth):
    rec, secret = auth.create_client("a")
    answer = auth.client_credentials(auth.authenticate(rec.client_id, secret))
    assert answer["token_type"] == "Bearer" and answer["expires_in"] == 3600 == ACCESS_TTL_S
    assert answer["scope"] == "*" and answer["access_token"] != answer["refresh_token"]
    t = auth.verify("Bearer " + answer["access_token"])
    assert t.client_id == rec.client_id and t.kind == "access"
    with pytest.raises(AuthError):  # a refresh token is no access token
        auth.verify("Bearer " + answer["refresh_token"])


def test_an_access_token_expires(auth, clock):
    rec, _ = auth.create_client("a")
    tok = auth.client_credentials(rec)["access_token"]
    clock.now += 3599
    auth.verify(tok)
    clock.now += 2
    with pytest.raises(AuthError, match="expired") as e:
        auth.verify(tok)
    assert e.value.error == "invalid_token" and 'error="invalid_token"' in e.value.www_authenticate()


def test_missing_and_malformed_tokens(auth):
    with pytest.raises(AuthError) as e:
        auth.verify(None)
    assert e.value.www_authenticate() == 'Bearer realm="microswarm"'  # RFC 6750: no error code
    with pytest.raises(AuthError):
        auth.verify("Basic abc def")
    with pytest.raises(AuthError, match="unknown"):
        auth.verify("Bearer msat_forged")


def test_scope_limits_the_services_a_token_reaches(auth):
    rec, _ = auth.create_client("a", ["pegawai.*"])
    t = auth.verify(auth.client_credentials(rec)["access_token"])
    auth.check(t, "pegawai.data")
    with pytest.raises(AuthError) as e:
        auth.check(t, "dosen.data")
    assert e.value.status == 403 and e.value.error == "insufficient_scope" and e.value.code == "forbidden"
    narrowed = auth.client_credentials(rec, "pegawai.data")
    assert narrowed["scope"] == "pegawai.data"
    with pytest.raises(AuthError) as e:
        auth.client_credentials(rec, "*")
    assert e.value.error == "invalid_scope"


def test_refresh_rotates_and_a_reused_refresh_token_revokes_its_family(auth):
    rec, _ = auth.create_client("a")
    first = auth.client_credentials(rec)
    second = auth.refresh(rec, first["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"]
    third = auth.refresh(rec, second["refresh_token"])
    auth.verify(third["access_token"])
    other_family = auth.client_credentials(rec)
    with pytest.raises(AuthError, match="already used") as e:
        auth.refresh(rec, first["refresh_token"])  # a copy of an old refresh token
    assert e.value.error == "invalid_grant"
    for tok in (first["access_token"], second["access_token"], third["access_token"]):
        with pytest.raises(AuthError):
            auth.verify(tok)
    with pytest.raises(AuthError):
        auth.refresh(rec, third["refresh_token"])
    auth.verify(other_family["access_token"])  # another grant of the same client is untouched


def test_a_refresh_token_belongs_to_its_client(auth):
    a, _ = auth.create_client("a")
    b, _ = auth.create_client("b")
    rt = auth.client_credentials(a)["refresh_token"]
    with pytest.raises(AuthError, match="unknown"):
        auth.refresh(b, rt)


def test_revocation_rfc7009(auth):
    a, _ = auth.create_client("a")
    b, _ = auth.create_client("b")
    g1, g2 = auth.client_credentials(a), auth.client_credentials(a)
    auth.revoke(b, g1["access_token"])  # another client's token: ignored, no error
    auth.verify(g1["access_token"])
    auth.revoke(a, g1["access_token"])
    with pytest.raises(AuthError):
        auth.verify(g1["access_token"])
    auth.refresh(a, g1["refresh_token"])  # revoking an access token leaves the refresh token
    auth.revoke(a, g2["refresh_token"])  # a refresh token takes its family with it
    with pytest.raises(AuthError):
        auth.verify(g2["access_token"])
    auth.revoke(a, "not a token")


def test_revoking_a_client_ends_its_tokens_and_a_held_token_object_sees_it(auth):
    rec, _ = auth.create_client("a")
    t = auth.verify(auth.client_credentials(rec)["access_token"])
    auth.revoke_client(rec.client_id)
    with pytest.raises(AuthError, match="revoked"):
        auth.check(t, "x.y")  # what a gRPC stream holds


def test_tokens_survive_a_restart_as_hashes_only(tmp_path, clock):
    a1 = Auth(tmp_path, clock=clock)
    rec, _ = a1.create_client("a")
    g = a1.client_credentials(rec)
    g2 = a1.refresh(rec, g["refresh_token"])
    revoked = a1.client_credentials(rec)
    a1.revoke(rec, revoked["access_token"])
    op = a1.operator_grant("admin-cred", "admin-cred")
    a1.close()
    journal = (tmp_path / "tokens.jsonl").read_text()
    for tok in (g["access_token"], g["refresh_token"], g2["access_token"], op["access_token"]):
        assert tok not in journal and token_digest(tok).hex() in journal
    assert stat.S_IMODE((tmp_path / "tokens.jsonl").stat().st_mode) == 0o600

    a2 = Auth(tmp_path, clock=clock)
    assert a2.verify(g2["access_token"]).client_id == rec.client_id
    assert a2.verify(op["access_token"]).client_id == OPERATOR
    with pytest.raises(AuthError):
        a2.verify(revoked["access_token"])
    with pytest.raises(AuthError, match="already used"):  # the rotation mark survived too
        a2.refresh(rec, g["refresh_token"])
    with pytest.raises(AuthError):
        a2.verify(g2["access_token"])  # ... and so did the family revocation it caused
    clock.now += 3601
    a2.housekeeping()
    a3 = Auth(tmp_path, clock=clock)
    assert not any(t.kind == "access" for t in a3.tokens.values())  # expired: compacted away


def test_operator_grant_needs_the_admin_credential_and_gets_no_refresh_token(auth):
    answer = auth.operator_grant("right", "right")
    assert "refresh_token" not in answer and answer["scope"] == "*"
    with pytest.raises(AuthError):
        auth.operator_grant("right", "wrong")
    with pytest.raises(AuthError):
        auth.operator_grant("", "")


def test_verification_takes_microseconds(auth):
    rec, _ = auth.create_client("a")
    tok = "Bearer " + auth.client_credentials(rec)["access_token"]
    auth.authorize(tok, "math.compute")
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        auth.authorize(tok, "math.compute")
    per_call_us = (time.perf_counter() - t0) / n * 1e6
    assert per_call_us < 20, per_call_us


# ---------------------------------------------------------------- through real processes

def _post_form(c: LocalCluster, url: str, form: dict[str, str], basic: tuple[str, str] | None = None
               ) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if basic:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
    req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), headers=headers, method="POST")
    return _send(c, req)


def _send(c: LocalCluster, req: urllib.request.Request) -> tuple[int, dict[str, str], Any]:
    """Over HTTPS, trusting exactly the cluster's coordinator certificate."""
    try:
        with c.urlopen(req, timeout=30) as r:
            body = r.read()
            return r.status, dict(r.headers), json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, dict(e.headers), json.loads(body) if body else None


def _call(c: LocalCluster, url: str, token: str | None, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return _send(c, urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST"))


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory):
    """A coordinator whose access tokens live 2 s, with its HTTP gateway; no agents (the coordinator runs jobs)."""
    c = LocalCluster(agents=0, http=True, workdir=str(tmp_path_factory.mktemp("auth")),
                     coordinator_args=["--token-ttl", "2"])
    with c:
        yield c


def test_token_flow_end_to_end_over_http(short):
    cred = short.create_client("flow")
    basic = (cred["client_id"], cred["client_secret"])
    token_url, url = short.http_url + "/oauth/token", short.http_url + "/v1/math/compute"
    body = {"a": 2, "b": 3, "op": "mul"}

    st, headers, tok = _post_form(short, token_url, {"grant_type": "client_credentials"}, basic)  # issue
    assert st == 200 and tok["token_type"] == "Bearer" and tok["expires_in"] == 2
    assert headers.get("Cache-Control") == "no-store"
    st, _, env = _call(short, url, tok["access_token"], body)  # use
    assert st == 200 and env["result"] == {"result": 6.0}

    wait_for(lambda: _call(short, url, tok["access_token"], body)[0] == 401, 10, "the token to expire")  # expire
    st, headers, env = _call(short, url, tok["access_token"], body)
    assert 'error="invalid_token"' in headers["WWW-Authenticate"] and "expired" in env["error"]["message"]

    refresh = {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]}
    st, _, tok2 = _post_form(short, token_url, refresh, basic)
    assert st == 200 and tok2["refresh_token"] != tok["refresh_token"]  # refresh rotates
    assert _call(short, url, tok2["access_token"], body)[0] == 200

    st, _, err = _post_form(short, token_url, refresh, basic)
    assert st == 400 and err["error"] == "invalid_grant"  # reuse detected: the family is revoked
    assert _call(short, url, tok2["access_token"], body)[0] == 401
    st, _, _ = _post_form(short, token_url, {"grant_type": "refresh_token", "refresh_token": tok2["refresh_token"]},
                          basic)
    assert st == 400

    st, _, tok3 = _post_form(short, token_url, {"grant_type": "client_credentials"}, basic)
    assert _call(short, url, tok3["access_token"], body)[0] == 200
    st, _, _ = _post_form(short, short.http_url + "/oauth/revoke", {"token": tok3["access_token"]}, basic)  # revoke
    assert st == 200
    st, headers, env = _call(short, url, tok3["access_token"], body)
    assert st == 401 and env["error"]["code"] == "unauthenticated"


def test_token_endpoint_refusals(short):
    cred = short.create_client("refusals")
    token_url = short.http_url + "/oauth/token"
    st, headers, err = _post_form(short, token_url, {"grant_type": "client_credentials"}, (cred["client_id"], "x" * 32))
    assert st == 401 and err["error"] == "invalid_client" and headers["WWW-Authenticate"].startswith("Basic")
    st, _, err = _post_form(short, token_url, {"grant_type": "password"}, (cred["client_id"], cred["client_secret"]))
    assert st == 400 and err["error"] == "unsupported_grant_type"
    st, _, err = _post_form(short, token_url, {}, (cred["client_id"], cred["client_secret"]))
    assert st == 400 and err["error"] == "invalid_request"
    st, _, err = _post_form(short, token_url, {"grant_type": "client_credentials", "client_id": cred["client_id"],
                                        "client_secret": cred["client_secret"]})
    assert st == 200  # client_secret_post works too


def test_grpc_calls_need_a_token_and_clients_renew_theirs(short):
    cred = short.create_client("grpc")
    with short.client(bearer="msat_forged") as c:
        env = c.envelope("math.compute", {"a": 1, "b": 1})
        assert env.error["code"] == "unauthenticated" and env.attempts == 0
    from microcores.client import Client
    # No state directory, so no admin credential; it trusts the coordinator as a remote client does, by the
    # key fingerprint the operator gives it (nothing else would let it send anything over TLS).
    with Client(short.addr, client_name="nobody", state_dir=str(short.dir / "no-such-state"),
                fingerprint=short.fingerprint()) as c:
        env = c.envelope("math.compute", {"a": 1, "b": 1})
        assert env.error["code"] == "unauthenticated" and "clients create" in env.error["message"]
    with short.client(client_id=cred["client_id"], client_secret=cred["client_secret"]) as c:
        first = c.token()
        assert c.envelope("math.compute", {"a": 1, "b": 1}).ok
        time.sleep(2.2)  # past the 2 s lifetime: the client renews by itself (with its refresh token)
        assert c.envelope("math.compute", {"a": 1, "b": 2}).ok
        assert c.token() != first
    with short.client(client_id=cred["client_id"], client_secret="wrong" * 6 + "xx") as c:
        with pytest.raises(Exception, match="could not get a token"):
            c.call("math.compute", {"a": 1, "b": 1})


def test_a_multiplexed_stream_carries_a_renewed_token(short):
    cred = short.create_client("stream")

    async def run() -> list[Any]:
        async with short.async_client(client_id=cred["client_id"], client_secret=cred["client_secret"]) as c:
            out = [await c.envelope("math.compute", {"a": 1, "b": 2})]
            await asyncio.sleep(2.2)  # the stream's token expired: the next batch carries a new one
            out += await asyncio.gather(*(c.envelope("math.compute", {"a": i, "b": 2}) for i in range(20)))
            return out

    envs = asyncio.run(run())
    assert all(e.ok for e in envs), [e.error for e in envs if not e.ok]


def test_cli_clients_create_list_revoke(short):
    cred = short.create_client("cli-made", "math.*")
    assert re.fullmatch(r"[A-Za-z0-9]{32}", cred["client_secret"]) and cred["scopes"] == ["math.*"]
    r = subprocess.run([*CLI, "clients", "create", "cli-made"], capture_output=True, text=True, env=short.env())
    assert r.returncode != 0 and "already exists" in r.stderr
    r = subprocess.run([*CLI, "clients", "list", "--json"], capture_output=True, text=True, env=short.env())
    listed = json.loads(r.stdout)
    assert any(x["client_id"] == cred["client_id"] for x in listed) and cred["client_secret"] not in r.stdout
    st, _, tok = _post_form(short, short.http_url + "/oauth/token", {"grant_type": "client_credentials"},
                            (cred["client_id"], cred["client_secret"]))
    assert st == 200
    r = subprocess.run([*CLI, "clients", "revoke", "cli-made"], capture_output=True, text=True, env=short.env())
    assert r.returncode == 0, r.stderr
    st, _, _ = _call(short, short.http_url + "/v1/math/compute", tok["access_token"], {"a": 1, "b": 1})
    assert st == 401
    r = subprocess.run([*CLI, "clients", "list"], capture_output=True, text=True, env=short.env())
    assert "cli-made" not in r.stdout
    r = subprocess.run([*CLI, "clients", "list", "--all"], capture_output=True, text=True, env=short.env())
    assert "cli-made" in r.stdout and "revoked" in r.stdout
    bad = dict(short.env(), MICROSWARM_STATE_DIR=str(short.dir / "elsewhere"))
    r = subprocess.run([*CLI, "clients", "list"], capture_output=True, text=True, env=bad)
    assert r.returncode != 0 and "admin credential" in r.stderr


def test_secrets_and_tokens_never_reach_logs_or_listings(short):
    cred = short.create_client("secretive")
    st, _, tok = _post_form(short, short.http_url + "/oauth/token", {"grant_type": "client_credentials"},
                            (cred["client_id"], cred["client_secret"]))
    _call(short, short.http_url + "/v1/math/compute", tok["access_token"], {"a": 1, "b": 1})
    _call(short, short.http_url + "/v1/math/compute", tok["access_token"] + "x", {"a": 1, "b": 1})
    _post_form(short, short.http_url + "/oauth/token",
               {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]},
               (cred["client_id"], cred["client_secret"]))
    _post_form(short, short.http_url + "/oauth/token", {"grant_type": "client_credentials"},
               (cred["client_id"], cred["client_secret"][::-1]))
    listing = "".join(subprocess.run([*CLI, "clients", "list", *extra], capture_output=True, text=True,
                                     env=short.env()).stdout for extra in ([], ["--json"], ["--all"]))
    status = subprocess.run([*CLI, "status", "--json"], capture_output=True, text=True, env=short.env()).stdout
    assert cred["client_id"] in listing
    texts = {"listing": listing, "status": status}
    for p in short.dir.rglob("*"):
        if p.is_file() and (p.suffix in (".log", ".jsonl", ".json") or p.name.endswith(".log")):
            texts[str(p)] = p.read_text(errors="replace")
    secrets_ = [cred["client_secret"], cred["client_secret"][::-1], tok["access_token"], tok["refresh_token"]]
    for where, text in texts.items():
        for s in secrets_:
            assert s not in text, f"a secret or token appears in {where}"
    refused = [c for c in json.loads(status)["calls"] if c["error_code"] == "unauthenticated"]
    assert refused and all(c["executed_by"] == "-" and c["service"] == "math.compute" for c in refused)


# ---------------------------------------------------------------- scope widening, token rate limits (issue 11)

def test_a_requested_scope_must_be_covered_as_a_pattern_not_as_a_string(auth):
    """`math.[!c]*` does not cover `math.*` although the string "math.*" matches it: refused."""
    assert not narrows("math.*", ("math.[!c]*",))
    assert narrows("math.[!c]*", ("math.[!c]*",)) and narrows("math.add", ("math.[!c]*",))
    assert not narrows("math.compute", ("math.[!c]*",))
    assert narrows("math.*", ("*",)) and narrows("math.[ab]*", ("*",))
    assert not narrows("math.?", ("math.*",)) and not narrows("math.[!c]*", ("math.*",))  # sound, not complete
    assert narrows("math.*", ("math.*", "x.y"))
    rec, _ = auth.create_client("narrow", ["math.[!c]*"])
    for wider in ("math.*", "*", "math.[!d]*", "math.c*"):
        with pytest.raises(AuthError) as e:
            auth.client_credentials(rec, wider)
        assert e.value.error == "invalid_scope" and e.value.status == 400 and "not covered" in e.value.description
    assert auth.client_credentials(rec, "math.add")["scope"] == "math.add"
    assert auth.client_credentials(rec, "math.[!c]*")["scope"] == "math.[!c]*"
    refresh = auth.client_credentials(rec)["refresh_token"]
    with pytest.raises(AuthError) as e:  # refreshing cannot widen either
        auth.refresh(rec, refresh, "math.*")
    assert e.value.error == "invalid_scope"


def test_token_requests_are_rate_limited_per_client_and_per_address(auth):
    from microswarm.coordinator.auth import TOKEN_LIMIT_PER_ADDRESS, TOKEN_LIMIT_PER_CLIENT, RateLimiter

    burst = int(TOKEN_LIMIT_PER_CLIENT[1])
    for _ in range(burst):
        auth.limit_token_requests("", "msc_a")
    with pytest.raises(AuthError) as e:
        auth.limit_token_requests("", "msc_a")
    assert e.value.status == 429 and e.value.error == "rate_limited" and 0 < e.value.retry_after <= 1.0
    assert "retry in" in e.value.description
    auth.limit_token_requests("", "msc_b")  # another client is not affected
    for _ in range(int(TOKEN_LIMIT_PER_ADDRESS[1])):
        auth.limit_token_requests("10.0.0.1")
    with pytest.raises(AuthError):
        auth.limit_token_requests("10.0.0.1", "msc_c")
    auth.limit_token_requests("10.0.0.2", "msc_c")

    lim = RateLimiter(1.0, 2.0, keys=4)  # bounded: at most `keys` buckets
    for i in range(100):
        assert lim.take(f"k{i}", now=1000.0 + i * 0.001) == 0.0
    assert len(lim.buckets) <= 4
    assert lim.take("x", now=2000.0) == 0.0 and lim.take("x", now=2000.0) == 0.0
    assert lim.take("x", now=2000.0) == pytest.approx(1.0) and lim.take("x", now=2001.0) == 0.0
