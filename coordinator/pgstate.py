"""The PostgreSQL connection of a coordinator started with --state-url: schema migrations, the
writes, and the change feed that keeps every coordinator of a cluster within a second of the others.

Why psycopg 3 and plain SQL migrations rather than SQLAlchemy + alembic: the feed needs LISTEN/
NOTIFY, which only a driver gives (psycopg, already needed); the schema is a handful of tables in
SQL; and coordinators starting at once must migrate once, which alembic leaves to the caller anyway.
So `migrate()` takes a session advisory lock, reads `schema_migrations`, and applies the missing
files of coordinator/migrations/ in order, each in its own transaction (DDL is transactional in
PostgreSQL): a second coordinator waits on the lock, then finds nothing to do.

Three connections, each to one thread at a time:
  - `tx()`: the one for what must succeed before an answer (publish, a new client, a revocation);
    it raises StoreUnavailable, naming the database, when PostgreSQL cannot be reached;
  - the writer thread: what may trail by a moment (bearer tokens, agents' key bindings), queued
    (bounded) and retried with back-off while the database is away, so calls keep being served;
  - the listener thread: LISTEN on one channel; each change another coordinator commits arrives as
    a NOTIFY (sent inside the writing transaction, so only when it committed) and is handed to the
    event loop. On every (re)connection `on_connect` runs first: whatever was missed is reloaded.
Going away and coming back are logged once each, not in a loop.
"""
from __future__ import annotations

import json
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from microcores.errors import Unavailable

log = logging.getLogger("microswarm.pgstate")

CHANNEL = "microswarm_state"
MIGRATIONS = Path(__file__).parent / "migrations"
LOCK_ID = 0x6D6963726F73776D  # "microswm": the advisory lock migrations run under
CONNECT_TIMEOUT_S = 3
BACKOFF_MAX_S = 2.0             # the listener and the writer retry at least this often
WRITE_QUEUE = 100_000           # pending background writes kept while the database is away


class StoreUnavailable(Unavailable, ValueError):
    """PostgreSQL could not be reached for a change that must be stored first (publish, clients)."""


def redact(url: str) -> str:
    """The URL without its password (it is logged and shown in errors)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def where(url: str) -> str:
    """host:port/dbname of a libpq URL or conninfo, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return redact(url)
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


class PgState:
    """One coordinator's link to the cluster's PostgreSQL (see the module docstring)."""

    def __init__(self, url: str) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"--state-url {redact(url)!r} must be a postgresql:// URL")
        self.url = url
        self.where = where(url)
        self.origin = secrets.token_hex(8)  # our own notifications come back to us: skipped
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.RLock()
        self._writes: queue.Queue[list[tuple[str, tuple[Any, ...]]] | None] = queue.Queue(WRITE_QUEUE)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.dropped_writes = 0
        self.listening = threading.Event()  # set while the listener is connected

    # ---------------------------------------------------------------- connections

    def connect(self, **kw: Any) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S, application_name="microswarm",
                                   keepalives=1, keepalives_idle=3, keepalives_interval=1, keepalives_count=2,
                                   tcp_user_timeout=CONNECT_TIMEOUT_S * 1000, **kw)
        except psycopg.Error as exc:
            raise self.unavailable(exc) from None

    def unavailable(self, exc: BaseException) -> StoreUnavailable:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StoreUnavailable(f"the state database PostgreSQL at {self.where} is unreachable ({first}); "
                                "calls are still served from memory, but this change is not made: retry "
                                "once the database is back")

    @contextmanager
    def tx(self) -> Iterator[psycopg.Cursor[Any]]:
        """A transaction on the shared connection (reconnected when it was lost); StoreUnavailable
        when the database cannot be reached, other database errors as they are."""
        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = self.connect()
            conn = self._conn
            try:
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if conn.broken or conn.closed:
                    self._conn = None
                    raise self.unavailable(exc) from None
                raise

    def notify(self, cur: psycopg.Cursor[Any], table: str, **payload: Any) -> None:
        """Tell the other coordinators, when this transaction commits."""
        cur.execute(*self.notify_sql(table, **payload))

    def notify_sql(self, table: str, **payload: Any) -> tuple[str, tuple[Any, ...]]:
        return "SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps({"t": table, "o": self.origin, **payload}))

    # ---------------------------------------------------------------- migrations

    def migrate(self) -> list[str]:
        """Apply the migrations this database lacks, under an advisory lock; the names applied."""
        files = sorted(MIGRATIONS.glob("[0-9]*.sql"))
        applied: list[str] = []
        with self.connect(autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
            try:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                             "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
                done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
                for f in files:
                    version = int(f.name.split("_", 1)[0])
                    if version in done:
                        continue
                    with conn.transaction():
                        conn.execute(f.read_text())  # type: ignore[call-overload]
                        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                     (version, f.name))
                    applied.append(f.name)
                    log.info("state database %s: migration %s applied", self.where, f.name)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
        return applied

    # ---------------------------------------------------------------- background writes

    def submit(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        """A write that may trail (tokens, bindings): statements run in one transaction by the writer
        thread (a NOTIFY among them goes out when it commits). Past WRITE_QUEUE pending writes it is
        dropped and counted."""
        try:
            self._writes.put_nowait(list(statements))
        except queue.Full:
            self.dropped_writes += 1
            if self.dropped_writes in (1, 1000, 100_000):
                log.error("state database %s away too long: %d background write(s) dropped", self.where,
                          self.dropped_writes)

    def _writer(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        batch: list[list[tuple[str, tuple[Any, ...]]]] = []
        down_since = 0.0
        backoff = 0.1
        while not self._stop.is_set():
            if not batch:
                item = self._writes.get()
                if item is None:
                    break
                batch.append(item)
                while len(batch) < 500:
                    try:
                        more = self._writes.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._stop.set()
                        break
                    batch.append(more)
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = self.connect()
                with conn.transaction(), conn.cursor() as cur:
                    for statements in batch:
                        for sql, params in statements:
                            cur.execute(sql, params)  # type: ignore[arg-type]
                batch = []
                if down_since:
                    log.warning("state database %s reachable again after %.1f s: queued writes stored",
                                self.where, time.monotonic() - down_since)
                    down_since, backoff = 0.0, 0.1
            except (StoreUnavailable, psycopg.OperationalError, psycopg.InterfaceError) as exc:
                conn = None
                if not down_since:
                    down_since = time.monotonic()
                    log.error("state database %s unreachable: tokens and key bindings are kept in memory and "
                              "stored when it is back (%s)", self.where, str(exc).splitlines()[0])
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
            except psycopg.Error as exc:  # a bad row: drop the batch, say so, go on
                log.error("state database %s refused %d write(s): %s", self.where, len(batch), exc)
                batch = []
        if conn is not None:
            conn.close()

    # ---------------------------------------------------------------- the change feed

    def listen(self, on_connect: Callable[[], None], on_change: Callable[[dict[str, Any]], None]) -> None:
        """Start the writer and the listener threads. `on_connect()` runs in the listener thread on each
        (re)connection, after LISTEN; `on_change(payload)` for each other coordinator's change."""
        for target, name in ((self._writer, "pg-writer"), (lambda: self._listener(on_connect, on_change),
                                                            "pg-listener")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _listener(self, on_connect: Callable[[], None], on_change: Callable[[dict[str, Any]], None]) -> None:
        down_since = 0.0
        backoff = 0.1
        while not self._stop.is_set():
            try:
                with self.connect(autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    on_connect()  # at start too: what changed before LISTEN is not missed
                    self.listening.set()
                    if down_since:
                        log.warning("state database %s reachable again after %.1f s: listening for changes",
                                    self.where, time.monotonic() - down_since)
                        down_since, backoff = 0.0, 0.1
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            try:
                                payload = json.loads(n.payload)
                            except ValueError:
                                continue
                            if payload.get("o") != self.origin:
                                on_change(payload)
            except (StoreUnavailable, psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.listening.clear()
                if self._stop.is_set():
                    break
                if not down_since:
                    down_since = time.monotonic()
                    log.error("state database %s unreachable: serving from memory; changes made on other "
                              "coordinators arrive when it is back (%s)", self.where, str(exc).splitlines()[0])
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
            except Exception:  # a handler's bug must not end the feed for good
                log.exception("state database %s: change feed failed; reconnecting", self.where)
                self._stop.wait(BACKOFF_MAX_S)

    def close(self, timeout: float = 3.0) -> None:
        """Store what the writer holds (as long as the database answers within `timeout`), then stop."""
        try:
            self._writes.put_nowait(None)
        except queue.Full:
            pass
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.name == "pg-writer":
                t.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
