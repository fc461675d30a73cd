"""A throwaway redis-server for tests and benchmarks: its own port, its own directory, nothing kept.

The shared cache (coordinator/cache_shared.py) is tested against a real Redis, never the machine's
own (6379) nor any server the test did not start: this starts `redis-server` from the machine's
binary on a free loopback port, in a temporary directory, with persistence off (`--save ''
--appendonly no`), waits until it answers PING (with a deadline), and stops it at the end. It can
also be stopped and started again on the same port, for "Redis goes away and comes back".
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CANDIDATES = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def redis_binary() -> str | None:
    """The redis-server on this machine, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    return next((p for p in CANDIDATES if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis answers PING on 127.0.0.1:port (a raw RESP exchange: no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """`with RedisServer() as r: r.url` — a redis-server of our own, gone at the end."""

    def __init__(self, port: int | None = None, maxmemory: str = "256mb", policy: str = "volatile-lru") -> None:
        binary = redis_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port or _free_port()
        self.maxmemory, self.policy = maxmemory, policy
        self.dir = Path(tempfile.mkdtemp(prefix="microswarm-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        log = open(self.dir / "redis.log", "ab")
        try:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                 "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no",
                 "--maxmemory", self.maxmemory, "--maxmemory-policy", self.policy],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not ping(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}):\n{self.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server on port {self.port} did not answer PING within {timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Stop it (SIGKILL by default: nothing to save); the directory stays until close()."""
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "RedisServer":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
