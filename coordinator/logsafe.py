"""Text an agent sent, made safe for a log line or the status view.

A volunteer controls its hostname, error texts, leaving reasons, package names and versions it
claims: written as they are, a newline in one of them forges a log line of its own. `safe()`
escapes every control and non-printable character the way `repr` does (so `\\n` stays two visible
characters) and truncates, saying how much was cut.
"""
from __future__ import annotations

from typing import Any

LIMIT = 200


def safe(text: Any, limit: int = LIMIT) -> str:
    """`text` with control characters escaped (repr style), at most about `limit` characters."""
    s = text if isinstance(text, str) else str(text)
    cut = len(s) - limit
    if cut > 0:
        s = s[:limit]
    if not s.isprintable():
        s = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in s)
    return f"{s}...(+{cut} chars)" if cut > 0 else s
