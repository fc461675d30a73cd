"""Pieces of large messages on the client call stream (`CallStream`).

gRPC moves a large payload much faster as a run of ~1 MiB messages than as one huge one
(measured here: a 10 MB round trip took 64-73 ms as one message, 34 ms as 1 MiB pieces).
"""
from __future__ import annotations

from typing import Iterator

from microswarm.protos import microswarm_pb2 as pb

from ._secure import _cut
from .errors import TooLarge

PIECE = 1 << 20
STREAM_MIN = 1 << 20        # a payload past this travels as pieces of its call (docs/design.md, Large payloads)
FRAME_PIECE = PIECE - 512   # a piece sent inside a link message: it and its framing fit one sealed frame
MAX_BATCH = 96 << 20


def pieces(data: bytes | list[bytes]) -> Iterator[pb.StreamChunk]:
    """`data` may be given as its parts (see batch_parts): the pieces are cut across them, so a large
    call's input is not first joined into one serialized batch."""
    if not isinstance(data, list):
        view = memoryview(data)
        n = max(1, -(-len(data) // PIECE))
        for i in range(n):
            yield pb.StreamChunk(data=bytes(view[i * PIECE:(i + 1) * PIECE]) if n > 1 else data, more=i < n - 1)
        return
    total = sum(len(p) for p in data)
    n = max(1, -(-total // PIECE))
    for i, piece in enumerate(_cut(data, PIECE, total)):
        yield pb.StreamChunk(data=piece if isinstance(piece, bytes) else bytes(piece), more=i < n - 1)


def batch_parts(head: bytes, field: int, messages: list[bytes]) -> list[bytes]:
    """A serialized batch as parts: `head` (the batch's other fields, serialized) followed by each
    serialized message as an entry of the repeated message field `field`. It parses as the batch
    with those messages appended (protobuf takes fields in any order), without copying each message
    into the batch and the batch into one buffer."""
    parts = [head]
    for m in messages:
        parts.append(_varint((field << 3) | 2) + _varint(len(m)))
        parts.append(m)
    return parts


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


class Assembler:
    """Joins pieces back into whole serialized batches, bounded in size."""

    def __init__(self, limit: int = MAX_BATCH) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: pb.StreamChunk) -> bytes | None:
        if not chunk.more and not self._parts:
            return chunk.data
        self._size += len(chunk.data)
        if self._size > self.limit:
            raise TooLarge(f"a call batch exceeds the limit of {self.limit} bytes")
        self._parts.append(chunk.data)
        if chunk.more:
            return None
        whole = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        return whole


def call_pieces(call: int, payload: bytes | memoryview, restart: bool = False) -> Iterator[pb.StreamChunk]:
    """One call's payload as pieces of that call (StreamChunk.call): a large input going up, a
    large result coming down. Each piece is sliced from the payload, never the whole copied."""
    view = memoryview(payload)
    n = max(1, -(-len(view) // PIECE))
    for i in range(n):
        yield pb.StreamChunk(call=call, data=bytes(view[i * PIECE:(i + 1) * PIECE]), more=i < n - 1,
                             restart=restart and i == 0)


class ResultPieces:
    """Large results arriving ahead of their replies, per call; a reply with result_size takes
    its call's pieces as its result. A `restart` piece drops what came before it (the coordinator
    moved the job after part of an output had passed)."""

    def __init__(self, limit: int = MAX_BATCH) -> None:
        self.limit = limit
        self._parts: dict[int, list[bytes]] = {}
        self._sizes: dict[int, int] = {}

    def take(self, chunk: pb.StreamChunk) -> None:
        if chunk.restart:
            self.pop(chunk.call)
        size = self._sizes.get(chunk.call, 0) + len(chunk.data)
        if size > self.limit:
            raise TooLarge(f"the result of call {chunk.call} exceeds the limit of {self.limit} bytes")
        self._sizes[chunk.call] = size
        self._parts.setdefault(chunk.call, []).append(chunk.data)

    def pop(self, call: int) -> None:
        self._parts.pop(call, None)
        self._sizes.pop(call, None)

    def complete(self, call: int, reply: pb.CallReply) -> None:
        """Put the call's pieces into its reply as its result (or drop them: the call failed)."""
        parts = self._parts.pop(call, [])
        got = self._sizes.pop(call, 0)
        if not reply.result_size or reply.status != "ok":
            return
        if got != reply.result_size:
            reply.status = "error"
            reply.error.CopyFrom(pb.Error(code="unavailable", message=(
                f"the result of {reply.service} arrived incomplete ({got} of {reply.result_size} bytes); "
                "retry the call")))
            return
        reply.result = parts[0] if len(parts) == 1 else b"".join(parts)
