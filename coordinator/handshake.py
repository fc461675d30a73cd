"""The coordinator's side of the agent-link handshake (protocol in microcores._secure).

It proves the coordinator's key, checks the agent's signature and join secret, and makes the
session; link.py serves the stream afterwards.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any

from microcores._secure import (PROTOCOL, check_len, coordinator_channel, derive_keys, hello_transcript, join_mac,
                                new_ephemeral, sign, verify)
from microcores.errors import ProtocolError
from protos import microswarm_pb2 as pb

from .agents import AgentSession

if TYPE_CHECKING:
    from .server import Coordinator

log = logging.getLogger("microswarm.agents")

AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HANDSHAKE_TIMEOUT = 10.0
SUITE = "AES-256-GCM"


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _read(context: Any) -> pb.LinkFrame:
    frame = await context.read()
    if not isinstance(frame, pb.LinkFrame):  # grpc.aio.EOF
        raise ProtocolError("agent closed the stream during the handshake")
    return frame


async def accept(c: "Coordinator", context: Any, address: str) -> AgentSession:
    """Authenticate a dialling agent; its session, registered in `c.agents`, or Refused."""
    frame = await _read(context)
    if frame.WhichOneof("kind") != "agent_hello":
        raise Refused("protocol_error", "expected AgentHello as the first frame")
    h = frame.agent_hello
    if h.protocol != PROTOCOL:
        raise Refused("protocol_version", f"agent speaks protocol {h.protocol}, this coordinator "
                      f"speaks {PROTOCOL}; upgrade the older side")
    if not AGENT_ID_RE.match(h.agent_id):
        raise Refused("bad_agent_id", f"agent id {h.agent_id[:70]!r} must be 1-64 letters, digits, "
                      "'.', '_' or '-'")
    check_len("agent_key", h.agent_key, 32)
    check_len("ephemeral", h.ephemeral, 32)
    check_len("nonce", h.nonce, 32)
    if not 1 <= h.slots <= 1024:
        raise Refused("bad_slots", f"slots {h.slots} must be between 1 and 1024")
    t = hello_transcript(h.protocol, h.agent_id, h.agent_key, h.ephemeral, h.nonce, h.slots)
    eph, eph_pub = new_ephemeral()
    nonce = secrets.token_bytes(32)
    t.add(c.state.public_key, eph_pub, nonce, SUITE)
    th = t.digest()
    await context.write(pb.LinkFrame(coordinator_hello=pb.CoordinatorHello(
        coordinator_key=c.state.public_key, ephemeral=eph_pub, nonce=nonce,
        signature=sign(c.state.identity, th, b"coordinator"), suite=SUITE)))
    frame = await _read(context)
    if frame.WhichOneof("kind") != "agent_proof":
        raise Refused("protocol_error", "expected AgentProof as the third frame")
    verify(h.agent_key, frame.agent_proof.signature, th, b"agent", "agent")
    proved = next((s for s in c.state.join_secrets()
                   if hmac.compare_digest(join_mac(s, th), frame.agent_proof.join_mac)), None)
    if proved is None:
        raise Refused("bad_join_secret", "join secret not accepted: get a current token with "
                      "`microswarm coordinator token` on the coordinator")
    existing = c.agents.get(h.agent_id)
    if existing is not None:
        if existing.agent_key != h.agent_key:
            raise Refused("duplicate_agent_id", f"an agent with id {h.agent_id!r} is already connected; "
                          "give each agent its own --id")
        log.info("agent %s reconnected; replacing its old session", h.agent_id)
        c.drop_agent(existing, "replaced by a new connection from the same agent")
    k_a2c, k_c2a = derive_keys(eph, h.ephemeral, th)
    session = AgentSession(h.agent_id, bytes(h.agent_key), address, h.slots, h.hostname,
                           coordinator_channel(SUITE, k_a2c, k_c2a), c)
    session.join_secret = hashlib.sha256(proved).digest()
    session.max_packages = h.max_packages
    c.quarantine.joined(session)
    c.agents[h.agent_id] = session
    return session
