"""`--log-format json`: one structured event per line, for log shippers (journald, Loki, ELK).

Each event is a JSON object with `ts` (Unix time, float), `time` (ISO 8601, UTC), `level`,
`logger`, `msg` and, where the code knows them, `agent`, `job`, `client`, `service`, `limit`
and other ids passed with `extra=`; an exception adds `exc`. What the daemons print on stdout
is wrapped the same way, so a JSON log holds nothing but JSON lines.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

# Attributes every LogRecord has: anything else on a record came from `extra=` (or a filter).
_STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            **self.static,
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                event[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        event["msg"] = record.getMessage()
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, ensure_ascii=False)


class JsonLines:
    """A text stream that turns each line written to it into a JSON log event on `target`."""

    def __init__(self, target: TextIO, logger: str = "microswarm.stdout") -> None:
        self.target = target
        self.logger = logger
        self._buf = ""

    def write(self, text: str) -> int:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if line.strip():
                now = time.time()
                self.target.write(json.dumps({
                    "ts": round(now, 6),
                    "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
                    "level": "info", "logger": self.logger, "msg": line}, ensure_ascii=False) + "\n")
        self.target.flush()
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.target, "encoding", "utf-8")


def setup_json_logging(level: str) -> None:
    """JSON events on stderr for every logger; stdout lines become events too."""
    import os

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if not isinstance(sys.stdout, JsonLines):
        sys.stdout = JsonLines(sys.stdout)  # type: ignore[assignment]
    os.environ["MICROSWARM_LOG_FORMAT"] = "json"  # job workers write JSON lines too
