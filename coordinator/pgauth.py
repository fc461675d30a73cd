"""OAuth clients and bearer tokens in PostgreSQL (--state-url): auth.Auth with its persistence
(clients.json, tokens.jsonl) replaced by the tables `oauth_clients` and `oauth_tokens`.

Checks stay in memory (a sha256 and a dict lookup per call), so calls are answered while the
database is away. A new client or a client's revocation is written before it is answered (it fails,
naming the database, when it cannot be); tokens are written behind by the writer thread, each with
a NOTIFY carrying the journal record tokens.jsonl would have held, which the other coordinators
replay: a token issued on one is good on all, a revoked one refused on all, within a second.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .auth import OPERATOR, Auth, ClientRecord, Token
from .pgstate import PgState, StoreUnavailable

TOKEN_COLUMNS = "digest, kind, client_id, scopes, expires, family, used, revoked"


class PgAuth(Auth):
    def __init__(self, db: PgState, state_path: Path | str, **kw: Any) -> None:
        self.db = db
        self._synced: dict[str, float] = {}  # client id -> its revocation time as stored
        super().__init__(state_path, **kw)

    # ------------------------------------------------------------ reading

    def _fetch_clients(self) -> dict[str, ClientRecord]:
        with self.db.tx() as cur:
            cur.execute("SELECT client_id, name, scopes, salt, secret_hash, created, revoked FROM oauth_clients")
            rows = cur.fetchall()
        clients = {r[0]: ClientRecord(r[0], r[1], tuple(r[2]), bytes(r[3]), bytes(r[4]), float(r[5]), float(r[6]))
                   for r in rows}
        self._synced = {c.client_id: c.revoked for c in clients.values()}
        return clients

    def _fetch_tokens(self) -> list[Token]:
        with self.db.tx() as cur:
            cur.execute(f"SELECT {TOKEN_COLUMNS} FROM oauth_tokens WHERE expires > %s", (self.clock(),))
            rows = cur.fetchall()
        return [Token(bytes(r[0]), r[1], r[2], tuple(r[3]), float(r[4]), r[5], revoked=r[7], used=r[6])
                for r in rows]

    def load(self) -> None:
        self.clients = self._fetch_clients()
        self.tokens.clear()
        self.families.clear()
        self.merge_tokens()

    def merge_tokens(self) -> None:
        """What the database holds, merged into memory (after a reconnection): tokens issued elsewhere
        are added, those revoked or rotated elsewhere follow; tokens issued here and not yet written
        (the writer holds them) stay."""
        for t in self._fetch_tokens():
            mine = self.tokens.get(t.digest)
            if t.revoked:
                if mine is not None:
                    self._drop(mine)
            elif mine is None:
                self._index(Token(t.digest, t.kind, t.client_id, t.scopes, t.expires, t.family, used=t.used))
            elif t.used:
                mine.used = True
        self._drop_orphans()

    def reload_clients(self) -> None:
        """Re-read the clients (the change feed, SIGHUP): a client gone or revoked loses its tokens."""
        self.clients = self._fetch_clients()
        self._drop_orphans()

    reload = reload_clients

    def _drop_orphans(self) -> None:
        for t in [t for t in self.tokens.values() if t.client_id != OPERATOR
                  and (t.client_id not in self.clients or self.clients[t.client_id].revoked)]:
            self._drop(t)

    def replay(self, record: dict[str, Any]) -> None:
        """A token journal record from another coordinator (the change feed)."""
        try:
            self._replay(record)
        except (KeyError, ValueError, TypeError):
            pass

    # ------------------------------------------------------------ writing

    def _compact(self) -> None:
        """Expired tokens leave memory; the database forgets them a minute later (any coordinator)."""
        now = self.clock()
        for t in [t for t in self.tokens.values() if not self._live(t, now)]:
            self._drop(t)
        self.db.submit(("DELETE FROM oauth_tokens WHERE expires < %s", (now - 60,)))

    def housekeeping(self) -> None:
        self._compact()

    def _append(self, record: str) -> None:
        r = json.loads(record)
        op = r["op"]
        stmt: tuple[str, tuple[Any, ...]]
        if op == "issue":
            stmt = ("INSERT INTO oauth_tokens (digest, kind, client_id, scopes, expires, family) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (digest) DO NOTHING",
                    (bytes.fromhex(r["h"]), r["kind"], r["client"], list(r["scopes"]), r["exp"], r["family"]))
        elif op == "used":
            stmt = ("UPDATE oauth_tokens SET used = true WHERE digest = %s", (bytes.fromhex(r["h"]),))
        elif op == "revoke":
            stmt = ("UPDATE oauth_tokens SET revoked = true WHERE digest = %s", (bytes.fromhex(r["h"]),))
        else:  # revoke_family
            stmt = ("UPDATE oauth_tokens SET revoked = true WHERE family = %s", (r["family"],))
        self.db.submit(stmt, self.db.notify_sql("tokens", r=r))

    def _save_clients(self) -> None:
        """Write the clients new or revoked here, now (StoreUnavailable when the database is away).
        A revocation only ever goes forward: GREATEST keeps one made on another coordinator."""
        changed = [c for c in self.clients.values() if self._synced.get(c.client_id) != c.revoked]
        if not changed:
            return
        with self.db.tx() as cur:
            for c in changed:
                cur.execute("INSERT INTO oauth_clients (client_id, name, scopes, salt, secret_hash, created, revoked) "
                            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (client_id) DO UPDATE SET "
                            "revoked = GREATEST(oauth_clients.revoked, EXCLUDED.revoked)",
                            (c.client_id, c.name, list(c.scopes), c.salt, c.secret_hash, c.created, c.revoked))
            self.db.notify(cur, "clients")
        self._synced.update({c.client_id: c.revoked for c in changed})

    def create_client(self, name: str, scopes: list[str] | tuple[str, ...] | None = None
                      ) -> tuple[ClientRecord, str]:
        before = dict(self.clients)
        try:
            return super().create_client(name, scopes)
        except StoreUnavailable:
            self.clients = before
            raise

    def revoke_client(self, ident: str) -> ClientRecord:
        rec = self.find_client(ident)
        was = rec.revoked
        try:
            return super().revoke_client(ident)
        except StoreUnavailable:
            rec.revoked = was
            raise
