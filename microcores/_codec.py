"""The safe codec: msgpack between our processes, JSON at the edges. Never pickle.

Values are what pydantic's python-mode dump yields; anything msgpack cannot carry natively
(datetimes, UUIDs, decimals, enums, sets) is reduced to its JSON form by pydantic itself.
"""
from __future__ import annotations

import json
from typing import Any

import msgpack
from pydantic_core import to_jsonable_python

from .errors import InvalidInput, TooLarge

MAX_PAYLOAD = 64 * 1024 * 1024  # bytes of one encoded input or result


def _default(obj: Any) -> Any:
    return to_jsonable_python(obj)


_packer_opts = {"default": _default, "use_bin_type": True, "datetime": False}


def pack(value: Any) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, **_packer_opts)  # msgpack ships no type hints
        return packed
    except OverflowError:  # an int beyond 64 bits, which a model's plain `int` lets through
        where = _big_int(value) or "a number"
        raise InvalidInput(f"{where} is out of range: integers must fit in 64 bits",
                           field=where if where != "a number" else "") from None


def _big_int(value: Any, path: str = "") -> str | None:
    """The dotted path of the first integer msgpack cannot carry (the slow path of an error only)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return path or "input" if not -(1 << 63) <= value < (1 << 64) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = _big_int(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def canonical(value: Any) -> bytes:
    """Deterministic encoding (sorted map keys) for cache keys and comparisons."""
    packed: bytes = msgpack.packb(_sorted(value), **_packer_opts)
    return packed


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [_sorted(v) for v in value]
    return value


def unpack(data: bytes, *, limit: int = MAX_PAYLOAD) -> Any:
    """Decode msgpack from a peer we do not trust: bounded, no extension types, strict maps."""
    if len(data) > limit:
        raise TooLarge(f"payload of {len(data)} bytes exceeds the limit of {limit} bytes")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except TooLarge:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidInput(f"payload is not valid msgpack: {exc}") from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise InvalidInput(f"msgpack extension type {code} is not accepted")


def loads_json(data: bytes | str, *, limit: int = MAX_PAYLOAD) -> Any:
    if len(data) > limit:
        raise TooLarge(f"JSON input of {len(data)} bytes exceeds the limit of {limit} bytes")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"input is not valid JSON: {exc}") from None


def dumps_json(value: Any) -> bytes:
    return json.dumps(value, default=_default, separators=(",", ":")).encode()
