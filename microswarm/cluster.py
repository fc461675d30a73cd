"""A local cluster of real processes: one coordinator and N agents on loopback.

The demo, the benchmark and the end-to-end tests all start their clusters through this, so
they exercise exactly what an operator would run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `cond` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class LocalCluster:
    def __init__(self, agents: int = 2, slots: int = 2, workdir: str | None = None,
                 coordinator_args: list[str] | None = None, agent_args: list[str] | None = None,
                 env: dict[str, str] | None = None, http: bool = False, state_url: str = "") -> None:
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="microswarm-"))
        self.state = self.dir / "state"
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.http_port = free_port() if http else 0  # the HTTP gateway (--http), when asked for
        self.n_agents = agents
        self.slots = slots
        self.coordinator_args = coordinator_args or []
        self.state_url = state_url  # --state-url: the shared state in PostgreSQL (peer() shares it)
        self.agent_args = agent_args or []
        self.extra_env = env or {}
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.token = ""
        self._logs: list[Any] = []

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e.update(MICROSWARM_COORDINATOR=self.addr, MICROSWARM_STATE_DIR=str(self.state), PYTHONUNBUFFERED="1")
        if not self.tls:
            e["MICROSWARM_INSECURE"] = "1"
        e.update(self.extra_env)
        return e

    def _spawn(self, args: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        f = open(self.dir / log, "ab")
        self._logs.append(f)
        return subprocess.Popen([sys.executable, "-m", "microswarm.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                env={**self.env(), **(env or {})}, start_new_session=True)

    @property
    def tls(self) -> bool:
        """Whether the coordinator serves TLS (the default; not with --insecure)."""
        return "--insecure" not in self.coordinator_args

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def cert_path(self) -> Path:
        """The certificate clients trust (written by the coordinator: STATE_DIR/coordinator.crt)."""
        return self.state / "coordinator.crt"

    def ssl_context(self) -> ssl.SSLContext | None:
        """HTTPS that trusts only this coordinator's certificate (None with --insecure)."""
        return ssl.create_default_context(cafile=str(self.cert_path)) if self.tls else None

    def urlopen(self, req: Any, timeout: float = 30) -> Any:
        """urllib.request.urlopen against this cluster's gateway, trusting its certificate."""
        import urllib.request
        return urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context())

    def spki_pin(self) -> str:
        """base64 SHA-256 of the certificate's public key: chromium's --ignore-certificate-errors-spki-list
        takes it, so a browser test trusts exactly this coordinator (a pin, not "ignore all errors")."""
        import base64
        import hashlib

        from cryptography import x509

        from microcores._tls import spki
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        return base64.b64encode(hashlib.sha256(spki(cert)).digest()).decode()

    def fingerprint(self) -> str:
        from microswarm.coordinator.state import StateDir
        return StateDir(self.state).fingerprint.hex()

    def client(self, **kwargs: Any) -> Any:
        """A Client of this cluster: the operator's, through the admin credential, unless given others
        (any client pins the coordinator's key from the state directory)."""
        from microcores.client import Client
        kwargs.setdefault("client_name", "cluster")
        kwargs.setdefault("state_dir", str(self.state))
        kwargs.setdefault("insecure", not self.tls)
        return Client(self.addr, **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        from microcores.client import AsyncClient
        kwargs.setdefault("client_name", "cluster")
        kwargs.setdefault("state_dir", str(self.state))
        kwargs.setdefault("insecure", not self.tls)
        return AsyncClient(self.addr, **kwargs)

    def start_coordinator(self, timeout: float = 30) -> None:
        self.coordinator = self._spawn(["coordinator", "start", "--listen", self.addr, "--state-dir", str(self.state),
                                        *(["--http", f"127.0.0.1:{self.http_port}"] if self.http_port else []),
                                        *(["--state-url", self.state_url] if self.state_url else []),
                                        *self.coordinator_args], "coordinator.log")
        from microcores.errors import MicroError
        with self.client() as c:
            def ready() -> bool:
                if self.coordinator and self.coordinator.poll() is not None:
                    raise RuntimeError("coordinator exited:\n" + self.log("coordinator.log")[-2000:])
                try:
                    c.status(timeout=2)
                    return True
                except MicroError:
                    return False
            wait_for(ready, timeout, "the coordinator to answer", 0.1)
        from microswarm.coordinator.store import open_state
        self.token = open_state(self.state, self.state_url).token()

    IDENTITY_FILES = ("identity.pem", "admin.token", "tls_key.pem", "coordinator.crt")

    def peer(self, agents: int = 0, **kwargs: Any) -> "LocalCluster":
        """Another coordinator of the same cluster (not started): its own state directory holding
        copies of this one's identity, operator credential and TLS key and certificate, the same
        --state-url, the same coordinator arguments unless given others. Call it once this one has
        started (its identity and certificate exist)."""
        if not (self.state / "identity.pem").exists():
            raise RuntimeError("start this coordinator before making its peer: the peer copies its identity")
        kwargs.setdefault("coordinator_args", list(self.coordinator_args))
        kwargs.setdefault("slots", self.slots)
        other = LocalCluster(agents=agents, state_url=self.state_url, **kwargs)
        other.state.mkdir(parents=True, mode=0o700)
        for name in self.IDENTITY_FILES:
            if (self.state / name).exists():
                shutil.copy2(self.state / name, other.state / name)
        return other

    def start_agent(self, agent_id: str, slots: int | None = None, extra: list[str] | None = None,
                    env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        p = self._spawn(["agent", "start", "--coordinator", self.addr, "--token", self.token, "--id", agent_id,
                         "--slots", str(slots or self.slots), "--state-dir", str(self.agent_state(agent_id)),
                         *self.agent_args, *(extra or [])], f"agent-{agent_id}.log", env)
        self.agents[agent_id] = p
        return p

    def agent_state(self, agent_id: str) -> Path:
        """The state directory of an agent started here (its packages and control socket)."""
        return self.dir / f"agent-{agent_id}"

    def wait_agents_ready(self, ids: list[str] | None = None, timeout: float = 60) -> None:
        """Until every agent is connected and (with placement `all`) holds every current package."""
        want = set(ids or self.agents)
        with self.client() as c:
            def ready() -> bool:
                for aid in want:
                    p = self.agents.get(aid)
                    if p is not None and p.poll() is not None:
                        raise RuntimeError(f"agent {aid} exited:\n" + self.log(f"agent-{aid}.log")[-2000:])
                st = c.status(timeout=5)
                current = {f"{s.name}@{s.version}" for s in st.services} if st.placement == "all" else set()
                ok = {a.agent_id for a in st.agents if a.state == "ready" and current <= set(a.versions)}
                return want <= ok
            wait_for(ready, timeout, f"agents {sorted(want)} to be ready", 0.1)

    def start(self) -> "LocalCluster":
        self.start_coordinator()
        for i in range(self.n_agents):
            self.start_agent(f"agent{i + 1}")
        self.wait_agents_ready()
        return self

    def create_client(self, name: str, *scopes: str) -> dict[str, Any]:
        """A gateway client made as the operator makes one (`microswarm clients create --json`):
        its client_id and client_secret."""
        args = [sys.executable, "-m", "microswarm.cli", "clients", "create", name, "--json"]
        for s in scopes:
            args += ["--scope", s]
        r = subprocess.run(args, capture_output=True, text=True, env=self.env(), timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"clients create {name} failed: {r.stderr.strip()}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def kill_agent(self, agent_id: str, sig: int = signal.SIGKILL) -> None:
        p = self.agents[agent_id]
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    def kill_coordinator(self, sig: int = signal.SIGKILL) -> None:
        """Signal the coordinator's process group (SIGKILL: a crash, nothing flushed) and reap it."""
        p = self.coordinator
        if p is None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            pass

    def log(self, name: str) -> str:
        try:
            return (self.dir / name).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15) -> None:
        procs = list(self.agents.values()) + ([self.coordinator] if self.coordinator else [])
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the whole group: workers too
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for f in self._logs:
            f.close()

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
