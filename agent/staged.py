"""Inputs the coordinator sent ahead of their jobs (coordinator/staging.py), held until a Job
names them. Bounded in bytes, count and age: the coordinator is trusted, but a stage it dropped
on a link that broke must not stay here for good. A job whose stage is missing or incomplete is
handed back unstarted (the coordinator then sends its input with the job, elsewhere)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from microcores._secure import MAX_MESSAGE
from microswarm.protos import microswarm_pb2 as pb

MAX_STAGED_BYTES = 2 * MAX_MESSAGE
MAX_STAGES = 64
STAGE_TTL_S = 300.0


@dataclass
class _Stage:
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    complete: bool = False
    since: float = field(default_factory=time.monotonic)


class StagedInputs:
    def __init__(self, max_bytes: int = MAX_STAGED_BYTES, max_stages: int = MAX_STAGES,
                 ttl_s: float = STAGE_TTL_S) -> None:
        self.max_bytes, self.max_stages, self.ttl_s = max_bytes, max_stages, ttl_s
        self._stages: dict[str, _Stage] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._stages)

    def take(self, msg: pb.StagedInput) -> None:
        if msg.drop:
            self._forget(msg.stage_id)
            return
        st = self._stages.get(msg.stage_id)
        if st is None:
            self._expire()
            if len(self._stages) >= self.max_stages:
                return  # its job will find no stage and be handed back
            st = self._stages[msg.stage_id] = _Stage()
        if st.complete:
            return
        if self.bytes + len(msg.data) > self.max_bytes:
            self._forget(msg.stage_id)
            return
        if msg.data:
            st.parts.append(msg.data)
            st.size += len(msg.data)
            self.bytes += len(msg.data)
        st.complete = msg.last

    def pop(self, stage_id: str) -> bytes:
        """The whole input of a stage (gone from here), or KeyError saying why not."""
        st = self._stages.get(stage_id)
        if st is None or not st.complete:
            self._forget(stage_id)
            raise KeyError(f"its input (sent ahead as {stage_id}) is {'incomplete' if st else 'not here'}")
        self._forget(stage_id)
        return st.parts[0] if len(st.parts) == 1 else b"".join(st.parts)

    def _forget(self, stage_id: str) -> None:
        st = self._stages.pop(stage_id, None)
        if st is not None:
            self.bytes -= st.size

    def _expire(self) -> None:
        old = time.monotonic() - self.ttl_s
        for sid in [sid for sid, st in self._stages.items() if st.since < old]:
            self._forget(sid)
