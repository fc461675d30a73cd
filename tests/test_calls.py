"""Submit now, fetch later: handles, ids fetched from another process, cancel, map, expiry, over
gRPC (Client, AsyncClient, the CLI) and HTTP (?async=1, /v1/calls/ID), with a real cluster."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest

from microcores.errors import UnknownCall
from microswarm.cluster import LocalCluster

CLI = [sys.executable, "-m", "microswarm.cli"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(agents=1, slots=2, http=True, workdir=str(tmp_path_factory.mktemp("calls")),
                     coordinator_args=["--result-ttl", "3"])
    with c:
        yield c


def cli(c: LocalCluster, *args: str, env: dict[str, str] | None = None, timeout: float = 90
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**c.env(), **(env or {})},
                          timeout=timeout)


def test_submit_then_result_cancel_and_map(cluster):
    with cluster.client() as c:
        h = c.submit("math.compute", {"a": 6, "b": 7, "op": "mul"})
        assert h.result(timeout=30) == {"result": 42.0}
        assert h.done() and h.envelope().call_id == h.id
        slow = c.submit("demo.sleep", {"seconds": 30})
        assert not slow.done()
        t0 = time.monotonic()
        assert slow.cancel()
        env = slow.envelope()
        assert env.error["code"] == "cancelled" and time.monotonic() - t0 < 10
        assert c.result(slow.id).error["code"] == "cancelled"  # by id too
        inputs = [{"a": i, "b": 1, "op": "add"} for i in range(25)]
        assert [r["result"] for r in c.map("math.compute", inputs, concurrency=4)] == [i + 1.0 for i in range(25)]
        envs = list(c.map("math.compute", [{"a": 1, "b": 0, "op": "div"}, {"a": 2, "b": 1}], envelopes=True))
        assert [e.ok for e in envs] == [False, True]
    # the slot the cancelled sleep held is free again: the agent runs new calls at once
    with cluster.client() as c:
        assert c.envelope("math.compute", {"a": 1, "b": 1}, timeout=10).ok


def test_a_result_is_fetched_by_another_process_of_the_same_client_only(cluster):
    cred = cluster.create_client("fetcher", "math.*")
    other = cluster.create_client("other", "math.*")
    with cluster.client(client_id=cred["client_id"], client_secret=cred["client_secret"]) as c:
        call_id = c.submit("math.compute", {"a": 20, "b": 22, "op": "add"}).id
    code = ("import json, sys; from microcores import Client\n"
            f"c = Client({cluster.addr!r}, client_id=sys.argv[1], client_secret=sys.argv[2], state_dir={str(cluster.state)!r})\n"
            f"print(json.dumps(c.result({call_id!r}, timeout=30).to_dict()))\n")
    r = subprocess.run([sys.executable, "-c", code, cred["client_id"], cred["client_secret"]], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-1500:]
    env = json.loads(r.stdout.strip().splitlines()[-1])
    assert env["status"] == "ok" and env["result"] == {"result": 42.0} and env["call_id"] == call_id
    with cluster.client(client_id=other["client_id"], client_secret=other["client_secret"]) as c:
        with pytest.raises(UnknownCall):  # another client does not find it (nor learns it exists)
            c.result(call_id)


def test_an_expired_id_is_unknown_call(cluster):
    with cluster.client() as c:
        h = c.submit("math.compute", {"a": 1, "b": 2})
        assert h.envelope(timeout=30).ok
        time.sleep(3.5)  # --result-ttl 3
        with pytest.raises(UnknownCall, match="expired"):
            c.result(h.id)


def test_async_client_submit(cluster):
    async def main() -> Any:
        async with cluster.async_client() as c:
            h = await c.submit("math.compute", {"a": 3, "b": 4, "op": "mul"})
            first = await h.result(timeout=30)
            got = [r async for r in c.map("math.compute", [{"a": i, "b": i} for i in range(10)], concurrency=3)]
            return first, got
    first, got = asyncio.run(main())
    assert first == {"result": 12.0} and [g["result"] for g in got] == [2.0 * i for i in range(10)]


def test_cli_submit_result_cancel_map(cluster, tmp_path):
    r = cli(cluster, "submit", "math.compute", '{"a": 2, "b": 3, "op": "add"}')
    assert r.returncode == 0, r.stderr
    call_id = r.stdout.strip().splitlines()[-1]
    r = cli(cluster, "result", call_id, "--wait", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["result"] == {"result": 5.0}
    slow = cli(cluster, "submit", "demo.sleep", '{"seconds": 30}').stdout.strip().splitlines()[-1]
    r = cli(cluster, "result", slow)
    assert r.returncode == 3 and "still running" in r.stderr
    r = cli(cluster, "cancel", slow)
    assert r.returncode == 0 and "cancelled" in r.stderr, r.stderr
    r = cli(cluster, "result", "c" + "0" * 32)
    assert r.returncode == 1 and "unknown_call" in r.stderr
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"a": i, "b": 10}) + "\n" for i in range(12)) + '{"a": "x", "b": 1}\n')
    r = cli(cluster, "map", "math.compute", str(inputs), "--concurrency", "4")
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x.get("result", {}).get("result") for x in lines[:12]] == [i + 10.0 for i in range(12)]
    assert lines[12]["status"] == "error" and lines[12]["error"]["code"] == "invalid_input"
    assert r.returncode == 1 and "1 of the calls failed" in r.stderr


def _http(c: LocalCluster, method: str, path: str, token: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(c.http_url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with c.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_async_submit_fetch_and_cancel(cluster):
    with cluster.client() as c:
        token = c.token()
    st, body = _http(cluster, "POST", "/v1/math/compute?async=1", token, {"a": 5, "b": 5, "op": "mul"})
    assert st == 202 and body["status"] == "pending" and body["url"] == f"/v1/calls/{body['call_id']}"
    st, env = _http(cluster, "GET", f"/v1/calls/{body['call_id']}?wait=20", token)
    assert st == 200 and env["result"] == {"result": 25.0} and env["call_id"] == body["call_id"]
    st, slow = _http(cluster, "POST", "/v1/demo/sleep?async=1", token, {"seconds": 30})
    assert st == 202
    assert _http(cluster, "GET", f"/v1/calls/{slow['call_id']}", token)[0] == 202  # still running
    st, env = _http(cluster, "DELETE", f"/v1/calls/{slow['call_id']}", token)
    assert st == 499 and env["error"]["code"] == "cancelled"
    st, env = _http(cluster, "GET", "/v1/calls/c" + "0" * 32, token)
    assert st == 404 and env["error"]["code"] == "unknown_call"
    assert _http(cluster, "GET", f"/v1/calls/{body['call_id']}", "not-a-token")[0] == 401
    with cluster.urlopen(cluster.http_url + "/openapi.json") as r:
        doc = json.loads(r.read())
    assert {"get", "delete"} <= doc["paths"]["/v1/calls/{call_id}"].keys()
    assert any(p["name"] == "async" for p in doc["paths"]["/v1/math/compute"]["post"]["parameters"])


def test_bare_microswarm_prints_help_and_version():
    r = subprocess.run(CLI, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage" in r.stdout.lower() and "submit" in r.stdout
    r = subprocess.run([sys.executable, "-m", "microswarm", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("microswarm ")
