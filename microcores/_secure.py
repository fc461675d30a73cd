"""Identity keys, join tokens, the agent-link handshake and its AEAD-sealed frames.

Handshake (agent A dials coordinator C; all three frames plaintext, everything later sealed):
  A -> C  AgentHello   id, A's Ed25519 key, X25519 ephemeral eA, nonce nA
  C -> A  CoordHello   C's Ed25519 key, ephemeral eC, nonce nC, suite, Sig_C(th)
  A -> C  AgentProof   Sig_A(th|"agent"), HMAC(join secret, th|"join")
th is a hash over every field sent so far, so neither side can be steered by a splice.
A checks sha256(C's key) against the fingerprint pinned in its token before trusting Sig_C;
C checks Sig_A and the join MAC. Session keys: HKDF-SHA256 over X25519(eA, eC), salted with
th, one key per direction. Frames carry a counter that is also the AEAD nonce: a replayed,
reordered, dropped or tampered frame fails and ends the session.

Refusals: before C's hello, a refusal is plaintext but signed by C over the agent's nonce and the
hello C received (refusal_payload); after it, also sealed with the new keys and signed over the
proof C received too. After Welcome every refusal is sealed. An agent ignores any other refusal.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
import asyncio

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from microswarm.protos import microswarm_pb2 as pb

from .errors import ProtocolError, TooLarge

PROTOCOL = 1
TOKEN_PREFIX = "msw1."
TOKEN_PREFIX_PUBLISHERS = "msw2."      # the same, followed by n x 32-byte publisher public keys
MAX_PUBLISHER_KEYS = 16
MAX_FRAME = 1024 * 1024            # plaintext bytes in one sealed frame
MAX_MESSAGE = 80 * 1024 * 1024     # plaintext bytes of one message, reassembled from frames
MIN_PIECE = 64 * 1024              # a piece that is not its message's last carries at least this (or max_frame)
BATCH_BYTES = 256 * 1024           # queued messages are coalesced into one sealed message up to this
_LEN = struct.Struct(">I")
SUITES = ("AES-256-GCM", "CHACHA20-POLY1305")


# ---------------------------------------------------------------- keys and tokens

def fingerprint(public_key: bytes) -> bytes:
    return hashlib.sha256(b"microswarm-key\0" + public_key).digest()


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_or_create_identity(path: Path) -> Ed25519PrivateKey:
    """The coordinator's long-term key; created once, kept private (0600)."""
    if path.exists():
        raw = path.read_bytes()
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except ValueError as exc:
            raise ValueError(f"{path} is not a PEM private key ({exc}); restore it from a backup "
                             "or remove it to make a new identity (agents then need new tokens)") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, expected an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private(path, pem)
    return key


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class JoinToken:
    """What a volunteer pastes: the coordinator's key fingerprint, a join secret and, when the
    coordinator was started with `--publisher-key`, the publisher keys the agent then requires on
    every package (`msw2.`; without publisher keys the token keeps its `msw1.` form)."""

    fingerprint: bytes
    secret: bytes
    publisher_keys: tuple[bytes, ...] = ()

    def encode(self) -> str:
        if not self.publisher_keys:
            return TOKEN_PREFIX + _b64(self.fingerprint + self.secret)
        return TOKEN_PREFIX_PUBLISHERS + _b64(self.fingerprint + self.secret + b"".join(self.publisher_keys))

    @classmethod
    def parse(cls, text: str) -> "JoinToken":
        text = text.strip()
        hint = ("a join token looks like 'msw1.' followed by 86 characters (or 'msw2.' and more, when it "
                "carries publisher keys); get one with `microswarm coordinator token` on the coordinator's machine")
        if text.startswith(TOKEN_PREFIX):
            prefix = TOKEN_PREFIX
        elif text.startswith(TOKEN_PREFIX_PUBLISHERS):
            prefix = TOKEN_PREFIX_PUBLISHERS
        else:
            raise ValueError(f"not a microswarm join token: {hint}")
        body = text[len(prefix):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise ValueError(f"join token is not valid base64url: {hint}") from None
        if prefix == TOKEN_PREFIX:
            if len(raw) != 64:
                raise ValueError(f"join token has {len(raw)} bytes, expected 64: {hint}")
            return cls(raw[:32], raw[32:])
        extra = len(raw) - 64
        if extra <= 0 or extra % 32:
            raise ValueError(f"msw2 join token has {len(raw)} bytes, expected 64 plus 32 per publisher key "
                             f"(damaged or cut short?): {hint}")
        keys = tuple(raw[i:i + 32] for i in range(64, len(raw), 32))
        if len(keys) > MAX_PUBLISHER_KEYS:
            raise ValueError(f"join token carries {len(keys)} publisher keys, at most {MAX_PUBLISHER_KEYS}")
        for k in keys:
            try:
                Ed25519PublicKey.from_public_bytes(k)
            except ValueError:
                raise ValueError(f"join token carries a publisher key that is not an Ed25519 public key: {hint}") from None
        return cls(raw[:32], raw[32:64], keys)

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def new_secret() -> bytes:
    return secrets.token_bytes(32)


# ---------------------------------------------------------------- transcript

class Transcript:
    def __init__(self) -> None:
        self._h = hashlib.sha256(b"microswarm/handshake/1")

    def add(self, *parts: bytes | str | int) -> None:
        for p in parts:
            if isinstance(p, int):
                p = struct.pack(">Q", p)
            elif isinstance(p, str):
                p = p.encode()
            self._h.update(struct.pack(">I", len(p)) + p)

    def digest(self) -> bytes:
        return self._h.copy().digest()


def hello_transcript(protocol: int, agent_id: str, agent_key: bytes, eph_a: bytes, nonce_a: bytes,
                     slots: int) -> Transcript:
    t = Transcript()
    t.add(protocol, agent_id, agent_key, eph_a, nonce_a, slots)
    return t


def check_len(name: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise ProtocolError(f"handshake field {name} has {len(value)} bytes, expected {n}")


def derive_keys(eph_private: X25519PrivateKey, peer_eph: bytes, th: bytes) -> tuple[bytes, bytes]:
    """(agent->coordinator key, coordinator->agent key)."""
    try:
        shared = eph_private.exchange(X25519PublicKey.from_public_bytes(peer_eph))
    except ValueError as exc:
        raise ProtocolError(f"bad ephemeral key from peer: {exc}") from None
    okm = HKDF(algorithm=SHA256(), length=64, salt=th, info=b"microswarm/1 session keys").derive(shared)
    return okm[:32], okm[32:]


def sign(key: Ed25519PrivateKey, th: bytes, label: bytes) -> bytes:
    return key.sign(label + th)


def verify(public: bytes, signature: bytes, th: bytes, label: bytes, who: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, label + th)
    except (InvalidSignature, ValueError):
        raise ProtocolError(f"{who}'s handshake signature does not verify") from None


def join_mac(secret: bytes, th: bytes) -> bytes:
    return hmac.new(secret, b"join" + th, hashlib.sha256).digest()


# ---------------------------------------------------------------- refusals during the handshake

def handshake_seen(hello_th: bytes, proof_signature: bytes = b"", proof_mac: bytes = b"") -> bytes:
    """A digest of the agent's handshake messages as one side has them: the hello transcript, and
    the AgentProof once sent. Both sides compute it; a relay that altered a message makes them differ."""
    t = Transcript()
    t.add(b"seen", hello_th, proof_signature, proof_mac)
    return t.digest()


def refusal_payload(nonce: bytes, code: str, message: str, seen: bytes = b"") -> bytes:
    """What the coordinator signs in a refusal during the handshake: "refusal" | the agent's hello
    nonce (fresh per attempt: no replay) | `seen` (handshake_seen of what it received: a relay that
    changed the agent's hello or proof cannot turn the answer into an authentic refusal) | code |
    message, each length-prefixed."""
    parts = (b"refusal", nonce, seen, code.encode(), message.encode())
    return b"microswarm/refusal/1" + b"".join(struct.pack(">I", len(p)) + p for p in parts)


def sign_refusal(key: Ed25519PrivateKey, nonce: bytes, code: str, message: str, seen: bytes = b"") -> bytes:
    return key.sign(refusal_payload(nonce, code, message, seen))


def refusal_verifies(pinned_fingerprint: bytes, coordinator_key: bytes, signature: bytes, nonce: bytes,
                     code: str, message: str, seen: bytes = b"") -> bool:
    """True only for a refusal signed by the pinned key over this attempt's nonce and what the agent sent."""
    if len(coordinator_key) != 32 or not hmac.compare_digest(fingerprint(coordinator_key), pinned_fingerprint):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(coordinator_key).verify(signature,
                                                                   refusal_payload(nonce, code, message, seen))
    except (InvalidSignature, ValueError):
        return False
    return True


def new_ephemeral() -> tuple[X25519PrivateKey, bytes]:
    k = X25519PrivateKey.generate()
    return k, k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---------------------------------------------------------------- sealed frames

def _aead(suite: str, key: bytes) -> AESGCM | ChaCha20Poly1305:
    if suite == "AES-256-GCM":
        return AESGCM(key)
    if suite == "CHACHA20-POLY1305":
        return ChaCha20Poly1305(key)
    raise ProtocolError(f"unknown AEAD suite {suite!r}; supported: {', '.join(SUITES)}")


class Channel:
    """One direction pair of a session: seals outgoing messages, opens incoming frames in order."""

    def __init__(self, suite: str, send_key: bytes, recv_key: bytes, send_label: bytes, recv_label: bytes,
                 max_frame: int = MAX_FRAME, max_message: int = MAX_MESSAGE) -> None:
        self._send = _aead(suite, send_key)
        self._recv = _aead(suite, recv_key)
        self._send_label = send_label
        self._recv_label = recv_label
        self.send_counter = 0
        self.recv_counter = 0
        self.max_frame = max_frame
        self.max_message = max_message
        self._pieces: list[bytes] = []
        self._assembled = 0
        self.partial_since = 0.0   # monotonic time the message being reassembled began
        self.partial_last = 0.0    # ...and its latest piece came

    @property
    def buffered(self) -> int:
        """Plaintext bytes held of a message not complete yet (what a peer can make us keep)."""
        return self._assembled

    def discard(self) -> None:
        """Drop a partial message (the session is over): its memory is free at once."""
        self._pieces.clear()
        self._assembled = 0

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return b"\0\0\0\0" + counter.to_bytes(8, "big")

    def seal(self, message: bytes) -> list[tuple[int, bytes, bool]]:
        """Encrypt one message as (counter, ciphertext, more) frames, none over max_frame."""
        return list(self.seal_iter(message))

    def seal_iter(self, message: bytes | list[bytes]) -> Iterator[tuple[int, bytes, bool]]:
        """Frames one at a time, so a large message is on the wire while the rest is sealed.

        `message` may be given as its parts (what collect_parts returns): the frames are cut across
        them, so a large payload is sealed straight from its own buffer instead of first being
        joined into one plaintext (only a frame that straddles two parts is copied, at most max_frame).
        Consume it whole before sealing anything else: counters are taken as frames are made."""
        parts = [message] if not isinstance(message, list) else message
        total = sum(len(p) for p in parts)
        if total > self.max_message:
            raise TooLarge(f"message of {total} bytes exceeds the limit of {self.max_message}")
        n = max(1, -(-total // self.max_frame))
        for i, piece in enumerate(_cut(parts, self.max_frame, total)):
            more = i < n - 1
            c = self.send_counter
            self.send_counter += 1
            yield c, self._send.encrypt(self._nonce(c), piece, self._send_label + (b"\1" if more else b"\0")), more

    def open(self, counter: int, ciphertext: bytes, more: bool) -> bytes | None:
        """Decrypt the next frame; the whole message once its last piece arrives, else None."""
        if counter != self.recv_counter:
            kind = "replayed" if counter < self.recv_counter else "reordered or dropped"
            raise ProtocolError(f"{kind} frame: counter {counter}, expected {self.recv_counter}; "
                                "the session ends")
        if len(ciphertext) > self.max_frame + 16:
            raise TooLarge(f"frame of {len(ciphertext)} bytes exceeds the limit of {self.max_frame + 16}")
        try:
            piece = self._recv.decrypt(self._nonce(counter), ciphertext,
                                       self._recv_label + (b"\1" if more else b"\0"))
        except InvalidTag:
            raise ProtocolError(f"tampered frame {counter}: authentication failed; the session ends") from None
        self.recv_counter += 1
        if more or self._pieces:
            if more and len(piece) < min(MIN_PIECE, self.max_frame):
                # an honest sender cuts at max_frame: tiny pieces would only cost us a frame each
                raise ProtocolError(f"frame {counter} carries {len(piece)} bytes of a message that goes on; "
                                    f"pieces before the last carry at least {min(MIN_PIECE, self.max_frame)}")
            self._assembled += len(piece)
            if self._assembled > self.max_message:
                self.discard()
                raise TooLarge(f"message exceeds the limit of {self.max_message} bytes")
            self._pieces.append(piece)
            if more:
                now = time.monotonic()
                if len(self._pieces) == 1:
                    self.partial_since = now
                self.partial_last = now
                return None
            whole = b"".join(self._pieces)
            self._pieces.clear()
            self._assembled = 0
            return whole
        return piece


def agent_channel(suite: str, k_a2c: bytes, k_c2a: bytes) -> Channel:
    return Channel(suite, k_a2c, k_c2a, b"a2c", b"c2a")


def coordinator_channel(suite: str, k_a2c: bytes, k_c2a: bytes) -> Channel:
    return Channel(suite, k_c2a, k_a2c, b"c2a", b"a2c")


# ---------------------------------------------------------------- batching

def collect(first: Any, queue: "asyncio.Queue[Any]") -> tuple[bytes, bool]:
    """One sealed message from `first` and whatever else is already queued.

    Under load many small messages wait in a session's outbox; sending them as one sealed
    message costs one gRPC write and one AEAD call instead of one each. The plaintext is a
    sequence of 4-byte-length-prefixed serialized messages. Returns (plaintext, saw_sentinel).
    """
    parts, stop = collect_parts(first, queue)
    return b"".join(parts), stop


def sealed_frame(counter: int, ciphertext: bytes, more: bool) -> pb.LinkFrame:
    """A LinkFrame carrying one sealed frame, its ciphertext copied once into it (a Sealed built
    apart and passed to LinkFrame(sealed=...) would be copied again, a whole frame each time)."""
    frame = pb.LinkFrame()
    sealed = frame.sealed
    sealed.counter = counter
    sealed.ciphertext = ciphertext
    sealed.more = more
    return frame


def collect_parts(first: Any, queue: "asyncio.Queue[Any]") -> tuple[list[bytes], bool]:
    """collect(), its plaintext as the list of its parts (length prefixes and serialized messages),
    for Channel.seal_iter: a large message (a job's input or result) is not copied into a joined
    plaintext before it is sealed."""
    parts: list[bytes] = []
    size = 0
    msg = first
    stop = False
    while True:
        data = msg.SerializeToString()
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
        size += len(data) + 4
        if size >= BATCH_BYTES or queue.empty():
            break
        msg = queue.get_nowait()
        if msg is None:
            stop = True
            break
    return parts, stop


def _cut(parts: list[bytes], size: int, total: int) -> Iterator[bytes | memoryview]:
    """The plaintext made of `parts`, in pieces of `size` bytes (the last one shorter; one empty
    piece for an empty plaintext). A piece inside one part is a view of it; one that straddles
    parts is joined (small messages batched together, or a length prefix and its message)."""
    if total == 0:
        yield b""
        return
    held: list[bytes | memoryview] = []
    have = 0
    for p in parts:
        view = memoryview(p)
        off, n = 0, len(view)
        while off < n:
            take = min(size - have, n - off)
            if not held and take == size:
                yield view[off:off + take]
            else:
                held.append(view[off:off + take])
                have += take
                if have == size:
                    yield b"".join(held)
                    held, have = [], 0
            off += take
    if held:
        yield held[0] if len(held) == 1 else b"".join(held)


def split(plaintext: bytes) -> list[memoryview]:
    """The messages of one sealed message; ProtocolError when the framing is malformed."""
    out = []
    view = memoryview(plaintext)
    off, n = 0, len(view)
    while off < n:
        if off + 4 > n:
            raise ProtocolError("truncated message length in a sealed batch")
        (length,) = _LEN.unpack_from(view, off)
        off += 4
        if off + length > n:
            raise ProtocolError(f"message length {length} runs past the end of its sealed batch")
        out.append(view[off:off + length])
        off += length
    return out
