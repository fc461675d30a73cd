"""The handshake's pieces and the sealed-frame channel, without a network."""
import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microcores._secure import (JoinToken, agent_channel, coordinator_channel, derive_keys, fingerprint,
                                hello_transcript, join_mac, new_ephemeral, public_bytes, sign, verify)
from microcores.errors import ProtocolError, TooLarge


def handshake():
    coord, agent = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    ea, ea_pub = new_ephemeral()
    ec, ec_pub = new_ephemeral()
    t = hello_transcript(1, "a1", public_bytes(agent), ea_pub, secrets.token_bytes(32), 2)
    t.add(public_bytes(coord), ec_pub, secrets.token_bytes(32), "AES-256-GCM")
    th = t.digest()
    return coord, agent, th, derive_keys(ea, ec_pub, th), derive_keys(ec, ea_pub, th)


def test_both_sides_derive_the_same_distinct_direction_keys():
    *_, ka, kc = handshake()
    assert ka == kc
    assert ka[0] != ka[1]


def test_signatures_bind_the_transcript():
    coord, _, th, *_ = handshake()
    sig = sign(coord, th, b"coordinator")
    verify(public_bytes(coord), sig, th, b"coordinator", "coordinator")
    with pytest.raises(ProtocolError, match="does not verify"):
        verify(public_bytes(coord), sig, th[:-1] + bytes([th[-1] ^ 1]), b"coordinator", "coordinator")
    with pytest.raises(ProtocolError):  # a signature for one role is no good for the other
        verify(public_bytes(coord), sig, th, b"agent", "coordinator")


def test_join_mac_depends_on_secret_and_transcript():
    th = secrets.token_bytes(32)
    s = secrets.token_bytes(32)
    assert join_mac(s, th) == join_mac(s, th)
    assert join_mac(s, th) != join_mac(secrets.token_bytes(32), th)
    assert join_mac(s, th) != join_mac(s, secrets.token_bytes(32))


def test_token_round_trip_and_clear_errors():
    key = Ed25519PrivateKey.generate()
    tok = JoinToken(fingerprint(public_bytes(key)), secrets.token_bytes(32))
    assert JoinToken.parse(tok.encode()) == tok
    assert JoinToken.parse("  " + tok.encode() + "\n") == tok
    for bad in ("not-a-token", "msw1.@@@", "msw1.AAAA"):
        with pytest.raises(ValueError, match="token"):
            JoinToken.parse(bad)


def channels():
    *_, (k_a2c, k_c2a), _ = handshake()
    return agent_channel("AES-256-GCM", k_a2c, k_c2a), coordinator_channel("AES-256-GCM", k_a2c, k_c2a)


def test_frames_round_trip_in_both_directions():
    a, c = channels()
    for msg in (b"", b"hello", secrets.token_bytes(5000)):
        (frame,) = a.seal(msg)
        assert c.open(*frame) == msg
        (frame,) = c.seal(msg)
        assert a.open(*frame) == msg


def test_large_messages_travel_in_bounded_frames():
    a, c = channels()
    a.max_frame = c.max_frame = 1000
    msg = secrets.token_bytes(10_500)
    frames = a.seal(msg)
    assert len(frames) == 11 and all(len(ct) <= 1016 for _, ct, _ in frames)
    assert [more for *_, more in frames] == [True] * 10 + [False]
    got = [c.open(*f) for f in frames]
    assert got[:-1] == [None] * 10 and got[-1] == msg


def test_tampered_frame_ends_the_session():
    a, c = channels()
    counter, ct, more = a.seal(b"transfer 10 coins")[0]
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    with pytest.raises(ProtocolError, match="tampered frame"):
        c.open(counter, bad, more)


def test_replayed_frame_is_refused():
    a, c = channels()
    f1 = a.seal(b"one")[0]
    assert c.open(*f1) == b"one"
    with pytest.raises(ProtocolError, match="replayed frame"):
        c.open(*f1)


def test_reordered_frame_is_refused():
    a, c = channels()
    f1, f2 = a.seal(b"one")[0], a.seal(b"two")[0]
    with pytest.raises(ProtocolError, match="reordered"):
        c.open(*f2)
    assert f1  # never delivered


def test_truncating_a_split_message_is_detected():
    a, c = channels()
    a.max_frame = c.max_frame = 10
    frames = a.seal(b"x" * 25)
    counter, ct, _ = frames[1]
    c.open(*frames[0])
    with pytest.raises(ProtocolError, match="tampered"):  # flipping `more` breaks the tag
        c.open(counter, ct, False)


def test_reflected_frame_fails():
    a, c = channels()
    frame = a.seal(b"to the coordinator")[0]
    with pytest.raises(ProtocolError):
        a.open(*frame)  # an agent must not accept its own frame sent back


def test_message_size_is_bounded():
    a, _ = channels()
    a.max_message = 100
    with pytest.raises(TooLarge):
        a.seal(b"x" * 101)


def test_batches_split_back_into_their_messages():
    import asyncio

    from microcores._secure import collect, split
    from microswarm.protos import microswarm_pb2 as pb

    q: asyncio.Queue = asyncio.Queue()
    msgs = [pb.Ping(seq=i) for i in range(5)]
    for m in msgs[1:]:
        q.put_nowait(m)
    q.put_nowait(None)
    plaintext, stop = collect(msgs[0], q)
    assert stop and q.empty()
    assert [pb.Ping.FromString(bytes(p)).seq for p in split(plaintext)] == [0, 1, 2, 3, 4]


def test_malformed_batch_is_a_protocol_error():
    from microcores._secure import split
    with pytest.raises(ProtocolError, match="runs past the end"):
        split(b"\x00\x00\x00\x09abc")
    with pytest.raises(ProtocolError, match="truncated"):
        split(b"\x00\x00")
