"""Where a coordinator keeps what must last: the storage seam.

The coordinator picks its store once, at construction (`open_store`), and takes from it the parts
that persist: the state directory (identity, registry and packages, join tokens, publisher keys:
StateDir), the clients and tokens (Auth) and the volunteers' tokens and key bindings (Volunteers).
FileStore is the embedded default, files in --state-dir, exactly as before there was a seam;
pgstore.PgStore (--state-url postgresql://...) keeps the shared parts in PostgreSQL and follows
the changes other coordinators make (`start`: the change feed; `close`: writes held are stored).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .auth import Auth
from .state import StateDir
from .volunteers import Volunteers

if TYPE_CHECKING:
    from .server import Coordinator

URL_ENV = "MICROSWARM_STATE_URL"


class Store(Protocol):
    kind: str
    state: StateDir

    def auth(self, **kw: Any) -> Auth: ...

    def volunteers(self) -> Volunteers: ...

    def start(self, c: "Coordinator") -> None: ...

    def close(self) -> None: ...


class FileStore:
    """Today's behaviour: every part reads and writes its files in the state directory."""

    kind = "files"

    def __init__(self, state_dir: str | Path) -> None:
        self.state = StateDir(state_dir)
        (self.state.path / "state_url").unlink(missing_ok=True)  # the CLI must not write to a database now

    def auth(self, **kw: Any) -> Auth:
        return Auth(self.state.path, **kw)

    def volunteers(self) -> Volunteers:
        return Volunteers(self.state.path)

    def start(self, c: "Coordinator") -> None:
        pass

    def close(self) -> None:
        pass


def open_store(state_dir: str | Path, state_url: str = "") -> Store:
    if not state_url:
        return FileStore(state_dir)
    from .pgstore import PgStore
    return PgStore(state_dir, state_url)


def state_url_for(state_dir: str | Path, given: str | None = None) -> str:
    """For the CLI's token commands: --state-url, else MICROSWARM_STATE_URL, else the URL the
    coordinator of this state directory was started with (STATE_DIR/state_url), else "" (files)."""
    if given:
        return given
    if os.environ.get(URL_ENV):
        return os.environ[URL_ENV]
    try:
        return (Path(state_dir).expanduser() / "state_url").read_text().strip()
    except OSError:
        return ""


def open_state(state_dir: str | Path, state_url: str = "") -> StateDir:
    """A StateDir for a command run beside the coordinator (join tokens): the database's when
    `state_url`, migrated first (a token may be minted before any coordinator ran)."""
    if not state_url:
        return StateDir(state_dir)
    from .pgstate import PgState
    from .pgstore import PgStateDir
    db = PgState(state_url)
    db.migrate()
    return PgStateDir(state_dir, db)
