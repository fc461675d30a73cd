"""The PostgreSQL store (--state-url): the state directory's shared parts in the cluster's database.

PgStateDir keeps what is a coordinator's own in its directory (identity.pem, admin.token, the TLS
key and certificate: copies of the first coordinator's, so all of them are one coordinator to agents
and clients) and moves the rest to PostgreSQL: the registry and package blobs, the publisher keys,
join tokens. Package files are still extracted under packages/<digest>/ (the coordinator loads the
classes from there), fetched from the database the first time a digest is needed.

PgStore hands each part of the coordinator what it uses (PgAuth, PgVolunteers) and runs the change
feed: a NOTIFY from another coordinator reloads the part it names, on the event loop.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb

from microcores._package import Package
from microcores._secure import write_private
from microcores.errors import PackageError

from . import pgvolunteers
from .auth import Auth
from .pgauth import PgAuth
from .pgstate import PgState, StoreUnavailable
from .state import StateDir
from .volunteers import VolunteerToken, Volunteers

if TYPE_CHECKING:
    from .server import Coordinator

log = logging.getLogger("microswarm.pgstate")

URL_FILE = "state_url"  # the --state-url a coordinator ran with: the CLI's token commands use it too


class PgStateDir(StateDir):
    def __init__(self, path: Path | str, db: PgState) -> None:
        super().__init__(path)
        self.db = db

    # -- join tokens and publisher keys

    def join_tokens(self) -> list[VolunteerToken]:
        return pgvolunteers.load_tokens(self.db)

    def add_join_secret(self) -> bytes:
        return pgvolunteers.add_shared(self.db)

    def mint_token(self, name: str, max_agents: int | None, max_slots: int | None) -> tuple[VolunteerToken, str]:
        return pgvolunteers.mint(self.db, name, max_agents, max_slots)

    def revoke_token(self, name: str) -> tuple[VolunteerToken, bool]:
        return pgvolunteers.revoke(self.db, name)

    def publisher_keys(self) -> list[bytes]:
        with self.db.tx() as cur:
            cur.execute("SELECT value FROM settings WHERE key = 'publisher_keys'")
            row = cur.fetchone()
        return [bytes.fromhex(k) for k in row[0]] if row else []

    def save_publisher_keys(self, keys: list[bytes]) -> None:
        with self.db.tx() as cur:
            cur.execute("INSERT INTO settings (key, value) VALUES ('publisher_keys', %s) ON CONFLICT (key) "
                        "DO UPDATE SET value = EXCLUDED.value", (Jsonb([k.hex() for k in keys]),))

    # -- the registry and packages

    def read_registry(self) -> list[dict[str, Any]]:
        with self.db.tx() as cur:
            cur.execute("SELECT name, version, digest, revision, published_at FROM registry ORDER BY seq")
            return [{"name": r[0], "version": r[1], "digest": r[2], "revision": r[3], "published_at": r[4]}
                    for r in cur.fetchall()]

    def add_published(self, published: list[dict[str, Any]], record: dict[str, Any], pkg: Package) -> None:
        try:
            with self.db.tx() as cur:
                cur.execute("INSERT INTO packages (digest, manifest, archive, signature, publisher_sig) "
                            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (digest) DO NOTHING",
                            (pkg.digest, pkg.manifest, pkg.archive, pkg.signature, pkg.publisher_signature))
                cur.execute("INSERT INTO registry (name, version, digest, revision, published_at) "
                            "VALUES (%(name)s, %(version)s, %(digest)s, %(revision)s, %(published_at)s)", record)
                self.db.notify(cur, "registry", digest=pkg.digest)
        except psycopg.errors.UniqueViolation:
            raise PackageError(f"{record['name']} revision {record['revision']} was published on another "
                               "coordinator at the same moment: publish again") from None

    def store_publisher_signature(self, pkg: Package) -> None:
        with self.db.tx() as cur:
            cur.execute("UPDATE packages SET publisher_sig = %s WHERE digest = %s", (pkg.publisher_signature,
                                                                                      pkg.digest))
        super().store_publisher_signature(pkg)

    def load_package(self, digest: str) -> Package:
        """From the local copy when it is whole, else from the database (then kept locally)."""
        d = self.package_dir(digest)
        if all((d / n).exists() for n in ("manifest.json", "manifest.sig", "archive.zip")):
            return super().load_package(digest)
        with self.db.tx() as cur:
            cur.execute("SELECT manifest, archive, signature, publisher_sig FROM packages WHERE digest = %s",
                        (digest,))
            row = cur.fetchone()
        if row is None:
            raise KeyError(f"package {digest[:12]} is not in the state database {self.db.where}")
        pkg = Package(bytes(row[0]), bytes(row[1]), bytes(row[2]), bytes(row[3]))
        if pkg.digest != digest:
            raise PackageError(f"package {digest[:12]} in the state database is damaged (its digest is "
                               f"{pkg.digest[:12]})")
        self.store_package(pkg)
        return pkg


class PgStore:
    """The parts of a coordinator that keep their state in PostgreSQL, and the change feed."""

    kind = "postgresql"
    state: StateDir

    def __init__(self, state_dir: str | Path, url: str) -> None:
        self.db = PgState(url)
        self.db.migrate()  # StoreUnavailable (a ValueError): the coordinator does not start, saying why
        self.state = PgStateDir(state_dir, self.db)
        write_private(self.state.path / URL_FILE, url.encode())
        self.c: Coordinator | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def auth(self, **kw: Any) -> Auth:
        return PgAuth(self.db, self.state.path, **kw)

    def volunteers(self) -> Volunteers:
        return pgvolunteers.PgVolunteers(self.db)

    def start(self, c: "Coordinator") -> None:
        self.c, self.loop = c, asyncio.get_running_loop()
        self.db.listen(self._connected, self._changed)
        log.info("shared state in PostgreSQL at %s (coordinator instance %s)", self.db.where, self.db.origin)

    def close(self) -> None:
        self.db.close()

    # -- the change feed: these two run in the listener thread; the rest on the event loop

    def _connected(self) -> None:
        self._prefetch()
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._reload_all)

    def _changed(self, payload: dict[str, Any]) -> None:
        if payload.get("t") == "registry":
            self._prefetch(payload.get("digest"))
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._apply, payload)

    def _prefetch(self, digest: str | None = None) -> None:
        """Fetch new packages here, off the event loop, so that reloading the registry finds them."""
        try:
            digests = [digest] if digest else [r["digest"] for r in self.state.read_registry()]
            for d in digests:
                self.state.load_package(d)
        except (StoreUnavailable, KeyError, OSError, PackageError) as exc:
            log.warning("could not fetch packages from the state database: %s", exc)

    def _apply(self, p: dict[str, Any]) -> None:
        c = self.c
        assert c is not None
        what = p.get("t")
        try:
            if what == "registry":
                self._reload_registry()
            elif what == "clients":
                c.auth.reload_clients()
            elif what == "tokens":
                c.auth.replay(p["r"])  # type: ignore[attr-defined]
            elif what == "join_tokens":
                c.volunteers.tokens.stale = True  # type: ignore[attr-defined]
                c.watch_tokens()
            elif what == "bind":
                self._bound(str(p["id"]), p.get("b"))
        except (StoreUnavailable, psycopg.Error) as exc:
            log.warning("change %r from another coordinator not applied yet (applied on reconnection): %s",
                        what, exc)

    def _reload_registry(self) -> None:
        c = self.c
        assert c is not None
        changed = c.registry.reload()
        if changed:
            log.info("registry changed on another coordinator: %s", ", ".join(changed))
            c._broadcast_holdings()
            c.holdings_changed()

    def _bound(self, agent_id: str, b: dict[str, Any] | None) -> None:
        c = self.c
        assert c is not None
        if c.volunteers.bindings.apply(agent_id, b):  # type: ignore[attr-defined]
            a = c.agents.get(agent_id)
            if a is not None and b is not None and a.agent_key.hex() != b["key"]:
                c.drop_agent(a, "its agent id is bound to another key (joined on another coordinator first)")

    def _reload_all(self) -> None:
        """After (re)connecting: whatever changed while we were not listening."""
        c = self.c
        assert c is not None
        try:
            self._reload_registry()
            c.auth.reload_clients()
            c.auth.merge_tokens()  # type: ignore[attr-defined]
            c.volunteers.bindings.flush()
            c.volunteers.tokens.stale = True  # type: ignore[attr-defined]
            c.watch_tokens()
        except (StoreUnavailable, psycopg.Error) as exc:
            log.warning("reload from the state database failed (retried on the next reconnection): %s", exc)
