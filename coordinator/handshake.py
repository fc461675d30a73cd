"""The coordinator's side of the agent-link handshake (protocol in microcores._secure).

It proves the coordinator's key, checks the agent's signature and join secret, applies the
volunteer rules (volunteers.py: the token's caps, the agent id bound to its key) and makes the
session; link.py serves the stream afterwards.

A refusal is never plain text an on-path relay could have written: before the coordinator's
hello it is signed over the agent's nonce and the hello received; after it, it is also sealed
(counter 0 of the coordinator->agent channel) and signed over the proof received too. So the
agent acts on it only if it refuses exactly what the agent sent (see `Refused.frame`).
"""
from __future__ import annotations

import logging
import re
import secrets
from typing import TYPE_CHECKING, Any

from microcores._secure import (PROTOCOL, Channel, check_len, coordinator_channel, derive_keys, handshake_seen,
                                hello_transcript, new_ephemeral, sign, sign_refusal, verify)
from microcores.errors import ProtocolError
from microswarm.protos import microswarm_pb2 as pb

from .agents import AgentSession
from .logsafe import safe
from .volunteers import Denied

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
        self.frame = pb.LinkFrame(refusal=pb.Refusal(code=code, message=message))  # see _Attempt.refusal

class _Attempt:
    """What the coordinator has of one handshake so far: what a refusal must be signed over and,
    once keys exist, the channel that seals it."""

    def __init__(self, c: "Coordinator") -> None:
        self.c = c
        self.nonce = b""
        self.seen = b""
        self.channel: Channel | None = None

    def refusal(self, code: str, message: str) -> Refused:
        r = Refused(code, message)
        refusal = pb.Refusal(code=code, message=message, coordinator_key=self.c.state.public_key,
                             signature=sign_refusal(self.c.state.identity, self.nonce, code, message, self.seen))
        if self.channel is None:
            r.frame = pb.LinkFrame(refusal=refusal)
            return r
        data = pb.ToAgent(refusal=refusal).SerializeToString()
        ((counter, ct, more),) = self.channel.seal(len(data).to_bytes(4, "big") + data)  # a batch of one
        r.frame = pb.LinkFrame(sealed=pb.Sealed(counter=counter, ciphertext=ct, more=more))
        return r


async def _read(context: Any) -> pb.LinkFrame:
    frame = await context.read()
    if not isinstance(frame, pb.LinkFrame):  # grpc.aio.EOF
        raise ProtocolError("agent closed the stream during the handshake")
    return frame


async def accept(c: "Coordinator", context: Any, address: str) -> AgentSession:
    """Authenticate a dialling agent; its session, registered in `c.agents`, or Refused (whose
    `frame` is the signed or sealed refusal to send)."""
    attempt = _Attempt(c)
    try:
        return await _accept(c, context, address, attempt)
    except Denied as d:
        raise attempt.refusal(d.code, d.message) from None
    except Refused as r:
        raise attempt.refusal(r.code, r.message) from None
    except ProtocolError as exc:
        raise attempt.refusal(exc.code, exc.message) from None


async def _accept(c: "Coordinator", context: Any, address: str, attempt: _Attempt) -> AgentSession:
    frame = await _read(context)
    if frame.WhichOneof("kind") != "agent_hello":
        raise Refused("protocol_error", "expected AgentHello as the first frame")
    h = frame.agent_hello
    t = hello_transcript(h.protocol, h.agent_id, h.agent_key, h.ephemeral, h.nonce, h.slots)
    attempt.nonce, attempt.seen = bytes(h.nonce), handshake_seen(t.digest())
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
    eph, eph_pub = new_ephemeral()
    nonce = secrets.token_bytes(32)
    t.add(c.state.public_key, eph_pub, nonce, SUITE)
    th = t.digest()
    k_a2c, k_c2a = derive_keys(eph, h.ephemeral, th)
    channel = coordinator_channel(SUITE, k_a2c, k_c2a)
    await context.write(pb.LinkFrame(coordinator_hello=pb.CoordinatorHello(
        coordinator_key=c.state.public_key, ephemeral=eph_pub, nonce=nonce,
        signature=sign(c.state.identity, th, b"coordinator"), suite=SUITE)))
    attempt.channel = channel
    frame = await _read(context)
    if frame.WhichOneof("kind") != "agent_proof":
        raise Refused("protocol_error", "expected AgentProof as the third frame")
    proof = frame.agent_proof
    attempt.seen = handshake_seen(th, proof.signature, proof.join_mac)
    verify(h.agent_key, proof.signature, th, b"agent", "agent")
    token = c.volunteers.tokens.match(th, proof.join_mac)
    if token is None and c.volunteers.tokens.changed():  # minted a moment ago, before the watcher's look
        c.watch_tokens()
        token = c.volunteers.tokens.match(th, proof.join_mac)
    if token is None:
        raise Refused("bad_join_secret", "join secret not accepted: get a current token with "
                      "`microswarm coordinator token` on the coordinator")
    key = bytes(h.agent_key)
    existing = c.agents.get(h.agent_id)
    if existing is not None and existing.agent_key != key:
        raise Refused("agent_id_taken", f"an agent with id {h.agent_id!r} is already connected with another "
                      "key; give each agent its own --id")
    others = [a for a in c.volunteer_agents(token.name)  # a named volunteer's other agents
              if a is not existing and not a.closed]
    granted = c.volunteers.admit(token, h.agent_id, key, h.slots, others, c.agents)  # Denied: refused
    if existing is not None:
        log.info("agent %s reconnected; replacing its old session", h.agent_id)
        c.drop_agent(existing, "replaced by a new connection from the same agent")
    if granted < h.slots:
        log.info("agent %s asked for %d slots; token %r grants %d", h.agent_id, h.slots, token.name, granted)
    session = AgentSession(h.agent_id, key, address, granted, safe(h.hostname, 64), channel, c)
    session.join_secret = token.digest
    session.token_name = token.name
    session.slots_asked = h.slots
    session.max_packages = h.max_packages
    c.quarantine.joined(session)
    c.add_agent(session)
    return session
