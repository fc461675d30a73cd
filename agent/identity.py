"""The agent's long-term identity: its Ed25519 key and its id, kept in its state directory.

The coordinator binds an agent id to the first key that joins under it, so an agent presents the
same key every time: `agent_key.pem` (0600) is made on first start and reused. An agent started
without `--id` keeps the id it generated in `agent_id`. Several agents may share one state
directory (the default one): each holds a lock on its id while it runs (`agent-locks/<id>.lock`),
so a second agent started without `--id` takes the next id file (`agent_id.2`, ...), and two
agents never run under one id from one directory (they would keep replacing each other).
"""
from __future__ import annotations

import fcntl
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microcores._secure import load_or_create_identity, write_private

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_IDS = 64  # agents without --id sharing one state directory
KEY_FILE = "agent_key.pem"


@dataclass
class Identity:
    agent_id: str
    key: Ed25519PrivateKey
    lock_fd: int = -1

    def release(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def check_id(agent_id: str) -> str:
    if not ID_RE.match(agent_id):
        raise ValueError(f"agent id {agent_id[:70]!r} must be 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return agent_id


def _lock(path: Path, blocking: bool) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _generated_id() -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:40].strip("-") or "agent"
    return f"{host}-{secrets.token_hex(3)}"


def claim(state_dir: str | Path, agent_id: str = "") -> Identity:
    """This agent's key and id (made on first use), with its id locked for as long as it runs.
    ValueError, saying why, when they cannot be had."""
    d = Path(state_dir or ".").expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        (d / "agent-locks").mkdir(exist_ok=True, mode=0o700)
        guard = _lock(d / "agent-locks" / ".identity", blocking=True)  # agents starting together
        assert guard is not None
        try:
            try:
                key = load_or_create_identity(d / KEY_FILE)
            except ValueError as exc:
                raise ValueError(f"the agent's key is unusable: {exc}. Its agent ids stay bound to the lost "
                                 "key: start it with a new --id") from None
            if agent_id:
                fd = _lock(d / "agent-locks" / f"{check_id(agent_id)}.lock", blocking=False)
                if fd is None:
                    raise ValueError(f"another agent with id {agent_id!r} is running from state directory {d}; "
                                     "give each agent its own --id (or --state-dir)")
                return Identity(agent_id, key, fd)
            for n in range(1, MAX_IDS + 1):
                p = d / ("agent_id" if n == 1 else f"agent_id.{n}")
                if p.exists():
                    aid = p.read_text().strip()
                    if not ID_RE.match(aid):
                        raise ValueError(f"{p} holds no valid agent id ({aid[:40]!r}); fix or remove it")
                else:
                    aid = _generated_id()
                    write_private(p, (aid + "\n").encode())
                fd = _lock(d / "agent-locks" / f"{aid}.lock", blocking=False)
                if fd is not None:
                    return Identity(aid, key, fd)
            raise ValueError(f"{MAX_IDS} agents already run from state directory {d}; give this one its own "
                             "--state-dir")
        finally:
            os.close(guard)
    except OSError as exc:
        raise ValueError(f"cannot keep the agent's key and id in {d}: {exc}") from None
