import datetime
import uuid

import msgpack
import pytest

from microcores import _codec
from microcores.errors import InvalidInput, TooLarge


def test_round_trip_keeps_bytes_and_nesting():
    v = {"a": 1, "b": [1.5, "x", None, True], "c": b"\x00\xff" * 10, "d": {"e": {"f": []}}}
    assert _codec.unpack(_codec.pack(v)) == v


def test_non_native_values_become_their_json_form():
    u = uuid.uuid4()
    d = datetime.date(2024, 2, 29)
    assert _codec.unpack(_codec.pack({"u": u, "d": d})) == {"u": str(u), "d": "2024-02-29"}


def test_canonical_is_independent_of_key_order():
    assert _codec.canonical({"b": 1, "a": {"y": 2, "x": 3}}) == _codec.canonical({"a": {"x": 3, "y": 2}, "b": 1})
    assert _codec.canonical({"a": 1}) != _codec.canonical({"a": 2})


def test_garbage_is_a_clear_error():
    with pytest.raises(InvalidInput, match="not valid msgpack"):
        _codec.unpack(b"\xc1\xc1\xc1")


def test_extension_types_are_refused():
    data = msgpack.packb(msgpack.ExtType(5, b"evil"))
    with pytest.raises(InvalidInput, match="extension type 5"):
        _codec.unpack(data)


def test_size_is_bounded():
    with pytest.raises(TooLarge, match="exceeds the limit"):
        _codec.unpack(b"\x00" * 101, limit=100)
    with pytest.raises(TooLarge):
        _codec.loads_json(b"[" * 101, limit=100)


def test_no_pickle_anywhere_in_the_codec():
    import inspect
    src = inspect.getsource(_codec)
    assert "pickle" not in src.replace("Never pickle", "")
