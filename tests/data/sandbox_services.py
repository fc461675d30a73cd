"""Services that try what shipped code must not do, for tests/test_sandbox.py.

`sandbox.probe` tries each attack and reports, per attempt, "allowed: ..." or "refused: ...":
read MICROSWARM_TOKEN from its environment and from the agent's /proc/<pid>/environ, open the
agent's memory, list and read the agent's state directory, connect to its control socket, write
into another package's extracted files, and open a TCP connection. `sandbox.netprobe` declares
`network = True` and only tries the connection.
"""
from __future__ import annotations

import os
import socket

from pydantic import BaseModel

from microcores import MicroCore


class ProbeIn(BaseModel):
    agent_pid: int = 0
    state_dir: str = ""
    other_file: str = ""   # a file of another package's extracted copy
    port: int = 0          # a TCP port listening on 127.0.0.1
    fill_mib: int = 0      # write this much into /tmp


class ProbeOut(BaseModel):
    results: dict[str, str]


def _try(fn) -> str:  # type: ignore[no-untyped-def]
    try:
        return "allowed: " + str(fn())[:200]
    except BaseException as exc:  # noqa: BLE001 - any failure is a refusal
        return f"refused: {type(exc).__name__}: {exc}"[:300]


def _env_token() -> str:
    v = os.environ.get("MICROSWARM_TOKEN")
    if v is None:
        raise KeyError("MICROSWARM_TOKEN not in the environment")
    return v


def _proc_environ(pid: int) -> str:
    data = open(f"/proc/{pid}/environ", "rb").read()
    if b"MICROSWARM_TOKEN=" not in data:
        raise PermissionError(f"/proc/{pid}/environ has no token (not the agent's)")
    return "token found"


def _proc_mem(pid: int) -> str:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(0x400000)
        return f"opened ({len(f.read(1))} byte read)"


def _state_list(state_dir: str) -> str:
    names = os.listdir(state_dir)
    if not names:
        raise FileNotFoundError(f"{state_dir} is empty here")
    return ",".join(sorted(names))


def _state_read(state_dir: str) -> str:
    for root, _dirs, files in os.walk(state_dir):
        for n in files:
            if "key" in n or n.endswith(".json"):
                return f"{n}: {len(open(os.path.join(root, n), 'rb').read())} bytes"
    raise FileNotFoundError("no file of the agent's state is visible")


def _control(state_dir: str) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(os.path.join(state_dir, "agent.sock"))
        return "connected"
    finally:
        s.close()


def _write_other(path: str) -> str:
    with open(path, "a") as f:
        f.write("\n# altered by another package\n")
    return "written"


def _fill_tmp(mib: int) -> str:
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "fill")
    try:
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(b"\0" * (1 << 20))
                f.flush()
        return f"{mib} MiB written"
    finally:
        os.unlink(path)


def _connect(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=3):
        return "connected"


class Probe(MicroCore[ProbeIn, ProbeOut]):
    name = "sandbox.probe"

    def process(self, data: ProbeIn) -> ProbeOut:
        r = {"env_token": _try(_env_token),
             "uid": f"info: uid {os.getuid()} pid {os.getpid()} home {os.environ.get('HOME')}"}
        if data.agent_pid:
            r["proc_environ"] = _try(lambda: _proc_environ(data.agent_pid))
            r["proc_mem"] = _try(lambda: _proc_mem(data.agent_pid))
        if data.state_dir:
            r["state_list"] = _try(lambda: _state_list(data.state_dir))
            r["state_read"] = _try(lambda: _state_read(data.state_dir))
            r["control_socket"] = _try(lambda: _control(data.state_dir))
        if data.other_file:
            r["write_other_package"] = _try(lambda: _write_other(data.other_file))
        if data.port:
            r["network"] = _try(lambda: _connect(data.port))
        if data.fill_mib:
            r["tmp_fill"] = _try(lambda: _fill_tmp(data.fill_mib))
        r["tmp_write"] = _try(lambda: open(os.path.join(os.environ.get("TMPDIR", "/tmp"), "x"), "w").write("ok"))
        return ProbeOut(results=r)


class NetProbe(MicroCore[ProbeIn, ProbeOut]):
    name = "sandbox.netprobe"
    network = True

    def process(self, data: ProbeIn) -> ProbeOut:
        return ProbeOut(results={"network": _try(lambda: _connect(data.port))})
