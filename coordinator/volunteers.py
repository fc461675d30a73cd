"""Volunteers: per-volunteer join tokens with caps, and agent ids bound to agents' keys.

A join token is the coordinator's key fingerprint and a join secret (microcores._secure.JoinToken).
`join_secrets.json` (0600) keeps the secrets; files written before named tokens existed (only
"secrets") load unchanged:

    {"secrets": ["<hex>", ...],                    # shared: `coordinator token [--new]`
     "tokens": [{"name": "alice", "secret": "<hex>", "max_agents": 2, "max_slots": 3,
                 "created": 1700000000.0, "revoked": null}]}   # `coordinator token --name alice`

A named token's agents together never hold more than its caps (0: no cap): past `max_agents`
an agent is refused (`token_max_agents`), and an agent asking for more slots than remain under
`max_slots` gets what remains. A revoked token keeps its entry (listed as revoked), so an agent
still holding it is told `token_revoked` rather than a bare `bad_join_secret`. The CLI edits the
file from another process; the coordinator keeps the tokens in memory and reloads them when the
file changes (TokenBook.changed(), checked twice a second).

`agent_keys.json` (0600) binds each agent id to the first key that joined under it, so after a
restart nobody else can take an id: another key asking for it is refused (`agent_id_taken`). The
ids one token may bind are bounded, so one token cannot grow the file without end; at the bound,
a binding of that token unseen for a week (an agent whose state directory was thrown away) gives
way to the new id, else the join is refused (`token_max_ids`).
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microcores._secure import join_mac, new_secret, write_private

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SECRETS_FILE = "join_secrets.json"
KEYS_FILE = "agent_keys.json"
SHARED_MAX_IDS = 4096          # ids the shared token(s) may bind
NAMED_MAX_IDS = 256            # ids a named token without --max-agents may bind
IDS_PER_AGENT = 4              # ...with --max-agents N: max(16, 4 N)
BINDING_TTL_S = 180 * 86400.0  # a binding unseen this long is forgotten
STALE_S = 7 * 86400.0          # at its token's cap, a binding unseen this long gives way to a new id
SEEN_EVERY_S = 3600.0          # how often a binding's last-seen time is written back
SAVE_EVERY_S = 0.5             # agent_keys.json is rewritten at most this often


class Denied(Exception):
    """A join the volunteer rules refuse; `code` is the Refusal's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class VolunteerToken:
    name: str                  # "" for a shared secret
    secret: bytes
    max_agents: int = 0        # 0: no cap
    max_slots: int = 0
    created: float = 0.0
    revoked: float = 0.0       # unix time; 0: active

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.secret).digest()

    def describe(self) -> dict[str, Any]:
        """What a listing shows: never the secret."""
        return {"name": self.name, "max_agents": self.max_agents, "max_slots": self.max_slots,
                "created": self.created, "revoked": self.revoked or None}

    def max_ids(self) -> int:
        if not self.name:
            return SHARED_MAX_IDS
        return max(16, IDS_PER_AGENT * self.max_agents) if self.max_agents else NAMED_MAX_IDS


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"token name {name[:70]!r} must be 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


# ---------------------------------------------------------------- join_secrets.json

@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialises read-modify-write of a state file between processes (the CLI and the coordinator)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_tokens(path: Path) -> list[VolunteerToken]:
    """Every token in the file, shared ones first; [] when there is no file; ValueError when damaged."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        out = [VolunteerToken("", bytes.fromhex(s)) for s in data.get("secrets", [])]
        for t in data.get("tokens", []):
            out.append(VolunteerToken(check_name(t["name"]), bytes.fromhex(t["secret"]), int(t.get("max_agents") or 0),
                                      int(t.get("max_slots") or 0), float(t.get("created") or 0),
                                      float(t.get("revoked") or 0)))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}); restore it, or remove it and issue new tokens") from None
    return out


def save_tokens(path: Path, tokens: list[VolunteerToken]) -> None:
    data: dict[str, Any] = {"secrets": [t.secret.hex() for t in tokens if not t.name]}
    named = [{**t.describe(), "secret": t.secret.hex()} for t in tokens if t.name]
    if named:
        data["tokens"] = named
    write_private(path, json.dumps(data, indent=1).encode())


def add_shared(path: Path) -> bytes:
    with _locked(path):
        tokens = load_tokens(path)
        s = new_secret()
        tokens.append(VolunteerToken("", s))
        save_tokens(path, tokens)
    return s


def mint(path: Path, name: str, max_agents: int | None = None, max_slots: int | None = None
         ) -> tuple[VolunteerToken, str]:
    """The token named `name`: made if new (or revoked: a new secret), else the same one, its caps
    changed to those given. Returns (token, "minted" | "unchanged" | "updated")."""
    check_name(name)
    for flag, v in (("--max-agents", max_agents), ("--max-slots", max_slots)):
        if v is not None and not 0 <= v <= 1_000_000:
            raise ValueError(f"{flag} {v} must be 0 (no cap) or a positive number")
    with _locked(path):
        tokens = load_tokens(path)
        tok = next((t for t in tokens if t.name == name and not t.revoked), None)
        what = "unchanged"
        if tok is None:
            tokens = [t for t in tokens if t.name != name]  # a revoked one of that name is replaced
            tok = VolunteerToken(name, new_secret(), max_agents or 0, max_slots or 0, round(time.time(), 3))
            tokens.append(tok)
            what = "minted"
        elif (max_agents is not None and max_agents != tok.max_agents) or \
                (max_slots is not None and max_slots != tok.max_slots):
            tok.max_agents = tok.max_agents if max_agents is None else max_agents
            tok.max_slots = tok.max_slots if max_slots is None else max_slots
            what = "updated"
        if what != "unchanged":
            save_tokens(path, tokens)
    return tok, what


def revoke(path: Path, name: str) -> tuple[VolunteerToken, bool]:
    """Mark the token revoked (its entry stays, listed as revoked). (token, False) if it already was."""
    with _locked(path):
        tokens = load_tokens(path)
        tok = next((t for t in tokens if t.name == name), None)
        if tok is None:
            named = sorted(t.name for t in tokens if t.name)
            raise KeyError(f"no token named {name!r}" + (f" (tokens: {', '.join(named)})" if named else ""))
        if tok.revoked:
            return tok, False
        tok.revoked = round(time.time(), 3)
        save_tokens(path, tokens)
    return tok, True


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a file rewritten by another process: (mtime_ns, size, inode); None when absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class TokenBook:
    """The coordinator's tokens, in memory; `changed()` says when the file was rewritten."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tokens: list[VolunteerToken] = []
        self.by_digest: dict[bytes, VolunteerToken] = {}
        self._stamp: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        return file_stamp(self.path) != self._stamp

    def load(self) -> None:
        stamp = file_stamp(self.path)
        tokens = load_tokens(self.path)  # ValueError: the current ones stay
        self.tokens, self._stamp = tokens, stamp
        self.by_digest = {t.digest: t for t in tokens}

    def active_digests(self) -> set[bytes]:
        return {d for d, t in self.by_digest.items() if not t.revoked}

    def match(self, th: bytes, mac: bytes) -> VolunteerToken | None:
        """The token whose secret made `mac` over this handshake (revoked ones too), or None."""
        return next((t for t in self.tokens if hmac.compare_digest(join_mac(t.secret, th), mac)), None)


# ---------------------------------------------------------------- agent_keys.json

class KeyBindings:
    """agent id -> the key that first joined under it (and the token it came with).

    Writes are coalesced: at most one every SAVE_EVERY_S (a fleet joining after a restart would
    otherwise rewrite the whole file per join, O(n^2)); flush() writes what is pending, and the
    coordinator calls it on its liveness tick and when it stops. A crash loses at most the
    bindings of the last SAVE_EVERY_S, whose agents are bound again by their next join."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.agents: dict[str, dict[str, Any]] = {}
        self._per_token: Counter[str] = Counter()  # bindings per token name, kept as agents bind
        self._touched = time.time()
        self._saved = 0.0
        self.dirty = False
        self.load()

    def load(self) -> None:
        if not self.path.exists():
            self.agents = {}
            return
        try:
            data = json.loads(self.path.read_text())["agents"]
            agents: dict[str, dict[str, Any]] = {str(k): {"key": str(v["key"]), "token": str(v.get("token", "")),
                               "since": float(v.get("since", 0)), "seen": float(v.get("seen", 0))}
                      for k, v in data.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Refuse to start rather than forget who owns which id: that is what squatters want.
            raise ValueError(f"{self.path} is damaged ({exc}); restore it from a backup, or remove it "
                             "(then the first key to join under each id owns it again)") from None
        cutoff = time.time() - BINDING_TTL_S
        self.agents = {k: v for k, v in agents.items() if v["seen"] >= cutoff}
        self._per_token = Counter(v["token"] for v in self.agents.values())

    def save(self) -> None:
        """Mark the bindings changed; written now unless written less than SAVE_EVERY_S ago."""
        self.dirty = True
        if time.monotonic() - self._saved >= SAVE_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.dirty:
            self.dirty = False
            self._saved = time.monotonic()
            write_private(self.path, json.dumps({"agents": self.agents}, separators=(",", ":"),
                                                sort_keys=True).encode())

    def owner(self, agent_id: str) -> bytes | None:
        b = self.agents.get(agent_id)
        return bytes.fromhex(b["key"]) if b is not None else None

    def touch(self, connected: Any) -> None:
        """Connected agents are seen (hourly at most): a long session does not make a binding stale."""
        now = time.time()
        if now - self._touched < SEEN_EVERY_S:
            return
        self._touched = now
        touched = [b for aid, b in self.agents.items() if aid in connected]
        for b in touched:
            b["seen"] = round(now, 3)
        if touched:
            self.save()

    def count(self, token_name: str) -> int:
        return self._per_token[token_name]

    def bind(self, agent_id: str, key: bytes, token: VolunteerToken, connected: Any = ()) -> None:
        """Record that `key` owns `agent_id` (first join), or that its owner was seen again. At the
        token's cap the binding seen longest ago gives way if it is stale (agents whose state was
        thrown away, as a container's), never one of the `connected` ids; else token_max_ids."""
        now = round(time.time(), 3)
        b = self.agents.get(agent_id)
        if b is None:
            if self.count(token.name) >= token.max_ids():
                stale = [(v["seen"], k) for k, v in self.agents.items()
                         if v["token"] == token.name and k not in connected and now - v["seen"] > STALE_S]
                if not stale:
                    who = f"token {token.name!r}" if token.name else "the shared join token"
                    raise Denied("token_max_ids", f"{who} has bound {token.max_ids()} agent ids already; reuse "
                                                  "an agent's id (its state directory keeps it), or ask the operator")
                self._per_token[self.agents.pop(min(stale)[1])["token"]] -= 1
            self.agents[agent_id] = {"key": key.hex(), "token": token.name, "since": now, "seen": now}
            self._per_token[token.name] += 1
        elif b["token"] != token.name or now - b["seen"] > SEEN_EVERY_S:
            self._per_token[b["token"]] -= 1
            self._per_token[token.name] += 1
            b["token"], b["seen"] = token.name, now
        else:
            return
        self.save()


class Volunteers:
    """What handshake.py asks: which token proved this join, may it join, and with how many slots."""

    def __init__(self, state_path: Path) -> None:
        self.tokens = TokenBook(state_path / SECRETS_FILE)
        self.bindings = KeyBindings(state_path / KEYS_FILE)

    def admit(self, token: VolunteerToken, agent_id: str, key: bytes, asked: int, others: list[Any],
              connected: Any = ()) -> int:
        """The slots granted to an agent joining with `token`, or Denied. `others`: the sessions
        connected with the same token (not one this join replaces), each with `.slots` granted;
        `connected`: the ids of every connected agent (their bindings are never given away)."""
        if token.revoked:
            raise Denied("token_revoked", f"the token {token.name!r} was revoked by the operator on "
                                          f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(token.revoked))}")
        owner = self.bindings.owner(agent_id)
        if owner is not None and not hmac.compare_digest(owner, key):
            raise Denied("agent_id_taken", f"agent id {agent_id!r} belongs to another agent (the key that "
                                           "first joined under it); give this agent its own --id")
        granted = asked
        if token.max_agents and len(others) >= token.max_agents:
            raise Denied("token_max_agents", f"token {token.name!r} allows {token.max_agents} agent(s) at once "
                                             f"and {len(others)} are connected; this one retries later")
        if token.max_slots:
            left = token.max_slots - sum(o.slots for o in others)
            if left <= 0:
                raise Denied("token_max_slots", f"token {token.name!r} allows {token.max_slots} slot(s) in all "
                                                "and its connected agents hold them; this one retries later")
            granted = min(asked, left)
        self.bindings.bind(agent_id, key, token, connected)
        return granted
