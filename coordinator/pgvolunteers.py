"""Join tokens and agents' key bindings in PostgreSQL (--state-url): the same rules as volunteers.py,
with the tables `join_tokens` and `agent_keys` in place of join_secrets.json and agent_keys.json.

Tokens are written at once (minting one is an operator's act: it fails when the database is away)
and every coordinator reloads them on the NOTIFY. Bindings are made during a handshake, where no
database round trip may wait: they are kept in memory, as with files, and written by the writer
thread; the upsert keeps the first key stored for an id, and the NOTIFY that follows carries the
row as the database holds it, so a coordinator that bound the same id to another key at the same
moment learns it lost (`apply` says so, and the coordinator drops that agent).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .pgstate import CHANNEL, LOCK_ID, PgState
from .volunteers import BINDING_TTL_S, KeyBindings, TokenBook, VolunteerToken, Volunteers, check_name

MINT_LOCK = LOCK_ID + 1
COLUMNS = "name, secret, max_agents, max_slots, created, revoked"


def _token(row: tuple[Any, ...]) -> VolunteerToken:
    return VolunteerToken(row[0], bytes(row[1]), int(row[2]), int(row[3]), float(row[4]), float(row[5]))


def load_tokens(db: PgState) -> list[VolunteerToken]:
    """Every join token, shared ones first (as volunteers.load_tokens)."""
    with db.tx() as cur:
        cur.execute(f"SELECT {COLUMNS} FROM join_tokens ORDER BY (name <> ''), id")
        return [_token(r) for r in cur.fetchall()]


def add_shared(db: PgState) -> bytes:
    from microcores._secure import new_secret
    s = new_secret()
    with db.tx() as cur:
        cur.execute("INSERT INTO join_tokens (name, secret, created) VALUES ('', %s, %s)", (s, time.time()))
        db.notify(cur, "join_tokens")
    return s


def mint(db: PgState, name: str, max_agents: int | None = None, max_slots: int | None = None
         ) -> tuple[VolunteerToken, str]:
    """As volunteers.mint, serialised between coordinators and CLIs by a transaction lock."""
    from microcores._secure import new_secret
    check_name(name)
    for flag, v in (("--max-agents", max_agents), ("--max-slots", max_slots)):
        if v is not None and not 0 <= v <= 1_000_000:
            raise ValueError(f"{flag} {v} must be 0 (no cap) or a positive number")
    with db.tx() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MINT_LOCK,))
        cur.execute(f"SELECT {COLUMNS} FROM join_tokens WHERE name = %s AND revoked = 0", (name,))
        row = cur.fetchone()
        if row is None:
            cur.execute("DELETE FROM join_tokens WHERE name = %s", (name,))  # a revoked one of that name
            tok = VolunteerToken(name, new_secret(), max_agents or 0, max_slots or 0, round(time.time(), 3))
            cur.execute(f"INSERT INTO join_tokens ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, 0)",
                        (tok.name, tok.secret, tok.max_agents, tok.max_slots, tok.created))
            what = "minted"
        else:
            tok, what = _token(row), "unchanged"
            if (max_agents is not None and max_agents != tok.max_agents) or \
                    (max_slots is not None and max_slots != tok.max_slots):
                tok.max_agents = tok.max_agents if max_agents is None else max_agents
                tok.max_slots = tok.max_slots if max_slots is None else max_slots
                cur.execute("UPDATE join_tokens SET max_agents = %s, max_slots = %s WHERE name = %s AND revoked = 0",
                            (tok.max_agents, tok.max_slots, name))
                what = "updated"
        if what != "unchanged":
            db.notify(cur, "join_tokens")
    return tok, what


def revoke(db: PgState, name: str) -> tuple[VolunteerToken, bool]:
    with db.tx() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MINT_LOCK,))
        cur.execute(f"SELECT {COLUMNS} FROM join_tokens WHERE name = %s ORDER BY revoked = 0 DESC, id DESC",
                    (name,))
        row = cur.fetchone()
        if row is None:
            cur.execute("SELECT name FROM join_tokens WHERE name <> '' ORDER BY name")
            named = [r[0] for r in cur.fetchall()]
            raise KeyError(f"no token named {name!r}" + (f" (tokens: {', '.join(named)})" if named else ""))
        tok = _token(row)
        if tok.revoked:
            return tok, False
        tok.revoked = round(time.time(), 3)
        cur.execute("UPDATE join_tokens SET revoked = %s WHERE name = %s AND revoked = 0", (tok.revoked, name))
        db.notify(cur, "join_tokens")
    return tok, True


class PgTokenBook(TokenBook):
    """The tokens in memory; `stale` is set by the change feed (the file's stamp is not there)."""

    def __init__(self, db: PgState) -> None:
        super().__init__(Path("join_tokens"))
        self.db = db
        self.stale = True

    def changed(self) -> bool:
        return self.stale

    def load(self) -> None:
        # StoreUnavailable (a ValueError) leaves the current ones, and `stale` off: no retry every
        # half second on the event loop; the listener's reconnection reloads them
        self.stale = False
        tokens = load_tokens(self.db)
        self.tokens = tokens
        self.by_digest = {t.digest: t for t in tokens}


class PgKeyBindings(KeyBindings):
    """Bindings in memory, written behind (see the module docstring); `flush` sends what changed."""

    def __init__(self, db: PgState) -> None:
        self.db = db
        self._synced: dict[str, dict[str, Any]] = {}
        super().__init__(Path("agent_keys"))

    def load(self) -> None:
        """Bindings seen within BINDING_TTL_S (older ones are deleted, as the file store forgets them)."""
        cutoff = time.time() - BINDING_TTL_S
        with self.db.tx() as cur:
            cur.execute("DELETE FROM agent_keys WHERE seen < %s", (cutoff,))
            cur.execute("SELECT agent_id, key, token, since, seen FROM agent_keys")
            rows = cur.fetchall()
        self.agents = {r[0]: {"key": bytes(r[1]).hex(), "token": r[2], "since": r[3], "seen": r[4]} for r in rows}
        self._recount()
        self._synced = {k: dict(v) for k, v in self.agents.items()}

    def _recount(self) -> None:
        from collections import Counter
        self._per_token = Counter(v["token"] for v in self.agents.values())

    def flush(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        self._saved = time.monotonic()
        for aid, b in self.agents.items():
            if self._synced.get(aid) != b:
                self._synced[aid] = dict(b)
                self.db.submit(
                    ("INSERT INTO agent_keys (agent_id, key, token, since, seen) VALUES (%s, %s, %s, %s, %s) "
                     "ON CONFLICT (agent_id) DO UPDATE SET token = EXCLUDED.token, "
                     "seen = GREATEST(agent_keys.seen, EXCLUDED.seen) WHERE agent_keys.key = EXCLUDED.key",
                     (aid, bytes.fromhex(b["key"]), b["token"], b["since"], b["seen"])),
                    self._notify_row(aid))
        for aid in [a for a in self._synced if a not in self.agents]:
            b = self._synced.pop(aid)
            self.db.submit(("DELETE FROM agent_keys WHERE agent_id = %s AND key = %s",
                            (aid, bytes.fromhex(b["key"]))), self._notify_row(aid))

    @staticmethod
    def _notify_row(aid: str) -> tuple[str, tuple[Any, ...]]:
        """A NOTIFY of the row as stored (or its absence), to every coordinator, this one too."""
        return ("SELECT pg_notify(%s, json_build_object('t', 'bind', 'o', '', 'id', %s::text, 'b', "
                "(SELECT json_build_object('key', encode(key, 'hex'), 'token', token, 'since', since, "
                "'seen', seen) FROM agent_keys WHERE agent_id = %s))::text)", (CHANNEL, aid, aid))

    def apply(self, agent_id: str, b: dict[str, Any] | None) -> bool:
        """The database's row for `agent_id` (None: gone). True when it binds the id to another key
        than this coordinator held: whoever joined here under it must go."""
        mine = self.agents.get(agent_id)
        if b is None:
            if mine is not None and self._synced.get(agent_id) == mine:
                del self.agents[agent_id]
                self._synced.pop(agent_id, None)
                self._recount()
            return False
        b = {"key": str(b["key"]), "token": str(b["token"]), "since": float(b["since"]), "seen": float(b["seen"])}
        lost = mine is not None and mine["key"] != b["key"]
        self.agents[agent_id] = b
        self._synced[agent_id] = dict(b)
        self._recount()
        return lost


class PgVolunteers(Volunteers):
    def __init__(self, db: PgState) -> None:  # no super(): both parts are the PostgreSQL ones
        self.tokens = PgTokenBook(db)
        self.bindings = PgKeyBindings(db)
