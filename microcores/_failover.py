"""A client of a cluster of coordinators (`a:7070,b:7070`, or MICROSWARM_COORDINATOR the same).

A client talks to one coordinator at a time and moves to the next when that one cannot be reached.
A call is sent again to the next coordinator only when doing so cannot run it twice: it never
reached the one that went away (the connection was refused), or its service may run again
(pure or idempotent: the scheduler's rule, which the client learns from the replies it gets,
CallReply.rerunnable). Any other call that was in flight is answered `unavailable`, saying it
may or may not have run.
"""
from __future__ import annotations

import threading

from .errors import MicroError, Unavailable

_NOT_SENT = ("failed to connect", "connection refused", "no route to host", "name resolution", "dns resolution")


class NotSent(Unavailable):
    """The coordinator could not be reached at all: the call went nowhere, so it may go elsewhere."""


def addresses(text: str) -> list[str]:
    """`a:7070,b:7070` as a list, with a clear error for an empty entry."""
    parts = [p.strip() for p in (text or "").split(",")]
    if len(parts) > 1 and any(not p for p in parts):
        raise ValueError(f"coordinator address {text!r} has an empty entry; give HOST:PORT[,HOST:PORT...]")
    return [p for p in parts if p]


def never_sent(details: str) -> bool:
    """gRPC's words for a connection that was never made (so no call went over it)."""
    low = (details or "").lower()
    return any(w in low for w in _NOT_SENT)


class Cluster:
    """The coordinators a client may use, the current one, and what it learnt of services."""

    def __init__(self, text: str) -> None:
        self.targets = addresses(text) or [text]
        self.index = 0
        self.rerunnable: set[str] = set()   # services whose replies said they may run again
        self.lock = threading.Lock()

    @property
    def target(self) -> str:
        return self.targets[self.index]

    @property
    def several(self) -> bool:
        return len(self.targets) > 1

    def learn(self, service: str, rerunnable: bool) -> None:
        if rerunnable:
            self.rerunnable.add(service)
        else:
            self.rerunnable.discard(service)

    def may_resend(self, service: str, sent: bool) -> bool:
        return self.several and (not sent or service in self.rerunnable)

    def move_or_raise(self, exc: Unavailable, service: str, target: str, moves: int) -> None:
        """After `exc` from `target`: return when the call should go to the next coordinator (the
        caller moves and sends it again); raise when it must not: no other left to try, or the
        call may have run and its service may not run twice (then saying so)."""
        if not self.several or moves >= len(self.targets) - 1:
            raise exc
        if not self.may_resend(service, sent=not isinstance(exc, NotSent)):
            raise self.lost(service, target) from None

    def advance(self, failed: str) -> bool:
        """Move past `failed`; False when another caller already did (its channel is the new one)."""
        with self.lock:
            if self.target != failed:
                return False
            self.index = (self.index + 1) % len(self.targets)
            return True

    def lost(self, service: str, target: str) -> MicroError:
        return Unavailable(f"the coordinator at {target} went away during the call to {service}; it was not sent "
                           "to another coordinator because the service is not idempotent: it may or may not have "
                           "run (mark it idempotent if running it twice does no harm)")
