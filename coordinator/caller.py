"""Who a call runs as: its client, the token (and so the scope) it was allowed with, its address.

`Dispatcher.call` puts the caller in a context variable for the call's task; a job the call sends
(agents.AgentSession.start_job, hedge copies included: they run in the same task) records it, so
a nested call that job makes runs as the same caller, inside the same scope, and the call log
names that caller and the agent that asked (`via_agent`). An agent never gets to be anyone.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, replace
from typing import Any

from microcores.errors import Forbidden, Unauthorized


@dataclass(frozen=True, slots=True)
class Caller:
    client: str                # the call log's label: the authenticated client id
    token: Any = None          # auth.Token it was allowed with; None: an in-process caller of our own
    address: str = ""
    via_agent: str = ""        # a nested call: the agent (or "coordinator") whose job asked for it

    def via(self, agent: str) -> "Caller":
        return replace(self, via_agent=agent)

    def check(self, service: str) -> None:
        """A nested call: still allowed for this caller (token not revoked, service within its scope).

        Expiry is not checked: the call was allowed when it started and its nested calls are part of it
        (a long job outlives an access token; its client renews the token, not the job's copy)."""
        t = self.token
        if t is None:
            return
        if t.revoked:
            raise Unauthorized(f"{service}: the token of the call that started this job ({self.client}) was revoked")
        if not t.permits(service):
            raise Forbidden(f"{service} is outside the scope of {self.client}, whose call started this job "
                            f"({' '.join(t.scopes)}): a nested call runs as its caller")


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("microswarm_caller", default=None)
