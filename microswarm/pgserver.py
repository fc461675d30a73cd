"""A throwaway PostgreSQL server for tests and benchmarks: initdb into a temporary directory, then
`postgres` on a free loopback port with its socket in that directory, trust authentication.

It never touches a server it did not start (the machine's own, on 5432, stays untouched). initdb
and postgres refuse to run as root, so as root the server runs as an unprivileged user (`nobody`,
else `postgres`) through subprocess's own uid switch: no sudo, runuser or setpriv needed, which is
what CI (root in a container) has. The binaries are found with a glob over
/usr/lib/postgresql/*/bin (newest first), then `pg_config --bindir`, then PATH.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

DB = "microswarm"
USER = "microswarm"


def find_bindir() -> Path | None:
    """The directory holding initdb and postgres, or None when PostgreSQL is not installed."""
    def version(p: str) -> float:
        try:
            return float(Path(p).parent.name)
        except ValueError:
            return 0.0
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(which).resolve().parent))
    for c in candidates:
        if (Path(c) / "initdb").exists() and (Path(c) / "postgres").exists():
            return Path(c)
    return None


def available() -> bool:
    return find_bindir() is not None


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unprivileged() -> pwd.struct_passwd | None:
    """As root: the user the server runs as; otherwise None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody", "postgres"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither 'nobody' nor 'postgres' exists to run PostgreSQL as")


class PgServer:
    """One throwaway server. `start()`, `url`, `stop()` (keeps the data: `start()` again brings it
    back on the same port), `cleanup()` (stops and deletes everything). A context manager."""

    def __init__(self, port: int = 0, workdir: str | None = None) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (no initdb/postgres under /usr/lib/postgresql/*/bin, "
                               "pg_config --bindir or PATH): apt-get install postgresql")
        self.bindir: Path = bindir
        self.user = _unprivileged()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="microswarm-pg-", dir=self._tmp()))
        self.data = self.dir / "data"
        self.port = port or _free_port()
        self.proc: subprocess.Popen[Any] | None = None
        self._initialised = False

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DB}"

    def database(self, name: str) -> str:
        """A new, empty database on this server (one per cluster: a database holds one cluster's
        packages, signed by its identity); its URL."""
        import psycopg
        if not name.isidentifier():
            raise ValueError(f"database name {name!r}: letters, digits and _ only")
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rpartition("/")[0] + "/" + name

    def _tmp(self) -> str | None:
        """Where the temporary directory goes: the usual place, unless the server's user could not
        reach it (TMPDIR under /root, say), then /tmp."""
        if self.user is None:
            return None
        p = Path(tempfile.gettempdir()).resolve()
        if all(q.stat().st_mode & 0o001 for q in [p, *p.parents]):
            return None
        return "/tmp"

    def _run_as(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _init(self) -> None:
        os.chmod(self.dir, 0o700)
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        env = {**os.environ, "LC_ALL": "C", "HOME": str(self.dir)}
        r = subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, "-A", "trust",
                            "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=self.dir, **self._run_as())
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        self._initialised = True

    def start(self, timeout: float = 30.0) -> "PgServer":
        if not self._initialised:
            self._init()
        log = open(self.dir / "postgres.log", "ab")
        env = {**os.environ, "LC_ALL": "C", "HOME": str(self.dir)}
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir, start_new_session=True,
            **self._run_as())
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import psycopg
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}):\n{self.log()[-2000:]}")
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres",
                                     connect_timeout=2, autocommit=True) as conn:
                    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,)).fetchone() is None:
                        conn.execute(f'CREATE DATABASE "{DB}"')
                return
            except psycopg.OperationalError as exc:
                last = str(exc).strip()
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"PostgreSQL on port {self.port} not ready after {timeout:.0f} s: {last}\n"
                           f"{self.log()[-2000:]}")

    def log(self) -> str:
        try:
            return (self.dir / "postgres.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), SIGKILL past `timeout`."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        try:
            os.kill(p.pid, signal.SIGINT)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PgServer":
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
