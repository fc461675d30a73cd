"""Errors that say where (issue 12), through real processes: a service's exception comes back with its
traceback inside its package (and nothing of the volunteer's machine) over gRPC, the CLI and HTTP;
unknown and missing input fields, bad outputs and bad service names are named."""
from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from microcores import MicroCore, ServiceError, ServiceFailed
from microcores._worker import service_traceback
from microcores.client import publish
from microcores.core import ServiceDefinitionError, check_definition, validate_model
from microcores.errors import InvalidInput, MicroError
from microswarm.cluster import LocalCluster

DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "microswarm.cli"]
SOURCE = (DATA / "failing_services.py").read_text().splitlines()
SCALE_LINE = next(i for i, line in enumerate(SOURCE, 1) if "return n / d" in line)
RATIO_LINE = next(i for i, line in enumerate(SOURCE, 1) if "return _scale(n, d)" in line)


def assert_where(details: str, *private: str) -> None:
    """The traceback names the package's file, the lines and functions, and the exception; it holds
    nothing of the machine that ran it."""
    assert f'File "failing_services.py", line {SCALE_LINE}, in _scale' in details, details
    assert f'File "failing_services.py", line {RATIO_LINE}, in _ratio' in details, details
    assert "in process" in details and "return n / d" in details
    assert details.rstrip().splitlines()[-1] == "ZeroDivisionError: division by zero", details
    assert "/microcores/" not in details and "_worker.py" not in details and "core.py" not in details
    host = socket.gethostname()
    assert host not in details, (host, details)
    for p in private:
        assert p not in details, (p, details)
    assert not any(line.strip().startswith('File "/') for line in details.splitlines()), details
    assert len(details.encode()) <= 8 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = LocalCluster(agents=1, http=True, workdir=str(tmp_path_factory.mktemp("where")))
    with c:
        publish(str(DATA / "failing_services.py"), coordinator=c.addr, state_dir=str(c.state))
        c.wait_agents_ready()
        # a worker for fail.ratio on agent1 first: it is not idempotent, so a job that waits for its
        # worker longer than the 1 s claim window (a loaded host) is run by the coordinator instead;
        # the job withdrawn that way still leaves its worker ready on the agent
        with c.client() as client:
            client.envelope("fail.ratio", {"n": 1, "d": 1})
        yield c


def cli(c: LocalCluster, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**c.env(), **(env or {})}, timeout=60)


def _private(c: LocalCluster) -> list[str]:
    return [str(c.agent_state("agent1").resolve()), str(c.agent_state("agent1")), str(c.dir), str(c.state)]


# ---------------------------------------------------------------- a service's exception, on an agent

def test_envelope_carries_the_traceback_within_the_package(cluster):
    with cluster.client() as c:
        env = c.envelope("fail.ratio", {"n": 1, "d": 0})
    assert not env.ok and env.executed_by == "agent1", env
    assert env.error["code"] == "service_error" and env.error["message"] == "ZeroDivisionError: division by zero"
    assert_where(env.error["details"], *_private(cluster))
    d = env.to_dict()
    assert d["error"]["details"] == env.error["details"]
    json.dumps(d)  # the envelope stays plain JSON


def test_client_raises_service_error_with_details(cluster):
    with cluster.client() as c:
        with pytest.raises(ServiceFailed) as e:
            c.call("fail.ratio", {"n": 3})
        assert c.call("fail.ratio", {"n": 3, "d": 2}) == {"ratio": 1.5}
    assert isinstance(e.value, ServiceError) and e.value.code == "service_error"
    assert_where(e.value.details, *_private(cluster))
    assert e.value.to_dict()["details"] == e.value.details


def test_call_cli_prints_the_details_after_the_error_line(cluster):
    r = cli(cluster, "call", "fail.ratio", '{"n": 1, "d": 0}')
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if "service_error" in line)
    assert "ZeroDivisionError: division by zero" in lines[first]
    details = "\n".join(lines[first + 1:])
    assert_where(details, *_private(cluster))
    r = cli(cluster, "call", "fail.ratio", '{"n": 1, "d": 0}', "--json")
    env = json.loads(r.stdout.strip().splitlines()[-1])
    assert_where(env["error"]["details"], *_private(cluster))


def _http(c: LocalCluster, method: str, path: str, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(c.http_url + path, data=data, headers=headers or {}, method=method)
    try:
        with c.urlopen(req) as r:  # HTTPS, trusting the cluster's certificate
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def token(cluster) -> str:
    cred = cluster.create_client("where")
    basic = base64.b64encode(f"{cred['client_id']}:{cred['client_secret']}".encode()).decode()
    st, body = _http(cluster, "POST", "/oauth/token", urllib.parse.urlencode({"grant_type": "client_credentials"}).encode(),
                     {"Authorization": "Basic " + basic, "Content-Type": "application/x-www-form-urlencoded"})
    assert st == 200, body
    return str(body["access_token"])


def test_http_error_object_includes_details(cluster, token):
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    st, env = _http(cluster, "POST", "/v1/fail/ratio", json.dumps({"n": 5, "d": 0}).encode(), auth)
    assert st == 500 and env["status"] == "error" and env["error"]["code"] == "service_error", env
    assert_where(env["error"]["details"], *_private(cluster))
    st, env = _http(cluster, "GET", "/v1/fail/ratio?n=5&d=0", headers=auth)
    assert st == 500 and "details" in env["error"]
    st, doc = _http(cluster, "GET", "/openapi.json", headers=auth)
    assert st == 200 and "details" in doc["components"]["schemas"]["Error"]["properties"]
    assert doc["components"]["schemas"]["fail.ratio.RatioIn"]["additionalProperties"] is False
    assert "additionalProperties" not in doc["components"]["schemas"]["fail.loose.LooseIn"] or \
        doc["components"]["schemas"]["fail.loose.LooseIn"]["additionalProperties"] is not False
    # an invalid input has no details
    st, env = _http(cluster, "POST", "/v1/fail/ratio", json.dumps({"n": "x"}).encode(), auth)
    assert st == 400 and "details" not in env["error"]


# ---------------------------------------------------------------- inputs and outputs named

def test_unknown_field_is_refused_naming_it(cluster, token):
    with cluster.client() as c:
        env = c.envelope("fail.ratio", {"n": 1, "d": 1, "x": 2})
        assert env.error["code"] == "invalid_input" and env.error["field"] == "x", env
        assert "unknown field 'x'" in env.error["message"] and env.executed_by == "coordinator"
        env = c.envelope("fail.loose", {"n": 1, "x": 2, "y": 3})  # its model allows extras
        assert env.ok and env.result == {"n": 1, "extras": ["x", "y"]}, env
    auth = {"Authorization": f"Bearer {token}"}
    st, env = _http(cluster, "GET", "/v1/fail/ratio?n=1&d=1&color=red", headers=auth)
    assert st == 400 and env["error"]["field"] == "color" and "unknown field 'color'" in env["error"]["message"]


def test_missing_field_is_required_and_empty_cannot_be(cluster):
    with cluster.client() as c:
        env = c.envelope("fail.ratio", {"d": 1})
        assert env.error == {"code": "invalid_input", "message": "n is required", "field": "n"}, env
        env = c.envelope("fail.ratio", {"n": None})
        assert env.error["message"] == "n cannot be empty" and env.error["field"] == "n"
    r = cli(cluster, "call", "fail.ratio", "{}")
    assert r.returncode != 0 and "n is required" in r.stderr


def test_bad_output_names_the_output_field(cluster):
    with cluster.client() as c:
        env = c.envelope("fail.bad_total", {"n": 2})
        assert env.error["code"] == "bad_output" and env.error["field"] == "label", env
        assert "label is required" in env.error["message"] and env.executed_by == "agent1"
        env = c.envelope("fail.bad_total", {"n": 0})
        assert env.error["code"] == "bad_output" and env.error["field"] == "total", env
        assert "total must be an integer" in env.error["message"]
        assert "details" not in env.error


# ---------------------------------------------------------------- the coordinator's own runs

def test_coordinator_run_carries_details_too(tmp_path):
    with LocalCluster(agents=0, workdir=str(tmp_path)) as c:
        publish(str(DATA / "failing_services.py"), coordinator=c.addr, state_dir=str(c.state))
        with c.client() as client:
            env = client.envelope("fail.ratio", {"n": 1, "d": 0})
    assert env.executed_by == "coordinator" and env.error["code"] == "service_error", env
    assert_where(env.error["details"], str(c.dir), str(c.state))


# ---------------------------------------------------------------- bad service names

def test_bad_name_is_one_line_naming_class_and_file(tmp_path):
    src = DATA / "bad_name_service.py"
    with pytest.raises(ServiceDefinitionError) as e:
        publish(str(src), coordinator="127.0.0.1:1", state_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "SquareIt" in msg and "bad_name_service.py:17" in msg and "group.function" in msg
    assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)
    # the CLI: one line on stderr, exit 1, no traceback
    r = subprocess.run([*CLI, "publish", str(src), "--coordinator", "127.0.0.1:1"], capture_output=True, text=True,
                       timeout=60, env={**__import__("os").environ, "MICROSWARM_STATE_DIR": str(tmp_path),
                                        "COLUMNS": "400"})
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "SquareIt" in lines[0] and "bad_name_service.py" in lines[0] and "group.function" in lines[0]


def test_a_name_changed_after_the_class_was_made_is_caught_at_publish(tmp_path):
    class In(BaseModel):
        n: int

    class Svc(MicroCore[In, In]):
        name = "ok.svc"

    Svc.name = "Not A Name"
    with pytest.raises(ServiceDefinitionError, match="class .*Svc.*group.function"):
        check_definition(Svc)
    with pytest.raises(ServiceDefinitionError, match="test_errors_where.py"):
        publish(Svc, coordinator="127.0.0.1:1", state_dir=str(tmp_path))


# ---------------------------------------------------------------- the pieces, in-process

class Strict(BaseModel):
    n: int


class Allows(BaseModel):
    model_config = ConfigDict(extra="allow")
    n: int


class Ignores(BaseModel):
    model_config = ConfigDict(extra="ignore")
    n: int


class Inner(BaseModel):
    model_config = ConfigDict(extra="allow")
    a: int


class Outer(BaseModel):
    n: int
    inner: Inner


@pytest.mark.parametrize("raw", [{"n": 1, "x": 2}, b'{"n": 1, "x": 2}'])
def test_validate_model_unknown_fields(raw, monkeypatch):
    import microcores.core as core
    for override in (True, False):  # pydantic's per-call `extra`, and the key check without it
        monkeypatch.setattr(core, "_EXTRA_OVERRIDE", override)
        with pytest.raises(InvalidInput) as e:
            validate_model(Strict, raw)
        assert e.value.field == "x" and e.value.message.startswith("unknown field 'x'")
        assert validate_model(Allows, raw).model_extra == {"x": 2}
        assert validate_model(Ignores, raw).n == 1
        # a nested model's own say over its extras stands; the top level's unknown fields are still refused
        assert validate_model(Outer, {"n": 1, "inner": {"a": 1, "b": 2}}).inner.model_extra == {"b": 2}
        with pytest.raises(InvalidInput) as e:
            validate_model(Outer, {"n": "x", "inner": {"a": 1, "b": 2}, "zz": 1})
        assert "n must be an integer" in e.value.message and "unknown field 'zz'" in e.value.message


def test_service_traceback_is_capped_and_keeps_the_package_only(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "deep.py").write_text("import os\n\n\ndef down(k):\n    if k == 0:\n        raise ValueError('open ' + "
                                 "os.path.dirname(os.path.dirname(__file__)) + '/secret/file x' * 2000)\n"
                                 "    return down(k - 1)\n")
    sys.path.insert(0, str(pkg))
    try:
        import deep  # type: ignore[import-not-found]
        try:
            deep.down(100)
        except ValueError as exc:
            details = service_traceback(exc, str(pkg))
    finally:
        sys.path.remove(str(pkg))
        sys.modules.pop("deep", None)
    assert len(details.encode()) <= 8 * 1024
    assert str(tmp_path) not in details and "test_errors_where" not in details
    assert details.count('File "deep.py"') <= 30 and "earlier frames left out" in details
    assert details.rstrip().splitlines()[-1].startswith("ValueError: open <path>")


def test_errors_round_trip_their_details():
    from microcores.errors import from_code
    e = from_code("service_error", "boom", details="Traceback ...")
    assert isinstance(e, ServiceError) and isinstance(e, ServiceFailed) and isinstance(e, MicroError)
    assert e.details == "Traceback ..." and e.to_dict() == {"code": "service_error", "message": "boom",
                                                              "details": "Traceback ..."}
    assert "details" not in from_code("invalid_input", "x", "n").to_dict()
