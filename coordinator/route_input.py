"""A route's input: checked against its JSON Schema before anything is forwarded, refused in the same
words as a MicroCore's input (microcores.core.validation_error, the paper's Table 3): `id is required`,
`id must be an integer`, `id cannot be empty`, `unknown field 'x': ...`, `id is out of range: must be
>= 1`; one message per field, joined with `; `, the first field in `field`.

Query strings carry text: `coerce_query` turns `?id=7` into 7 where the schema says integer (as
pydantic's lax mode does for a MicroCore), and leaves what does not convert for the schema to refuse.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError

from microcores.errors import InvalidInput

SCALARS = {"string", "integer", "number", "boolean", "null"}
_WORDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
          "object": "an object", "array": "a list", "null": "null"}
_FORMATS = {"date": "a date in YYYY-MM-DD format", "date-time": "a datetime in ISO 8601 format",
            "time": "a time in HH:MM:SS format", "email": "an email address", "uri": "a URI", "uuid": "a UUID",
            "ipv4": "an IPv4 address", "ipv6": "an IPv6 address"}
_INT = re.compile(r"^[+-]?\d+$")
_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}


class InputSchema:
    """One route's compiled schema (built once, when the route is applied)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self.validator = Draft202012Validator(schema, format_checker=FormatChecker())
        self.props: dict[str, Any] = schema.get("properties", {})
        self.scalar = all(_types(p) <= SCALARS and _types(p) for p in self.props.values())

    def validate(self, value: Any) -> None:
        """InvalidInput in the Table 3 words, or nothing."""
        if not isinstance(value, dict):
            raise InvalidInput("input must be a JSON object with the service's fields", field="input")
        errors = list(self.validator.iter_errors(value))
        if errors:
            raise _refusal(errors)

    def coerce_query(self, query: dict[str, str]) -> dict[str, Any]:
        """Query parameters (text) converted where the schema gives a field a non-string type."""
        out: dict[str, Any] = {}
        for k, v in query.items():
            out[k] = _coerce(v, _types(self.props.get(k, {})))
        return out


def _types(schema: Any) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    if "enum" in schema or "const" in schema:
        return {"string"}  # compared as given
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return set().union(*(_types(s) for s in schema[key]))
    return set()


def _coerce(text: str, types: set[str]) -> Any:
    if "string" in types or not types:
        return text
    if "integer" in types and _INT.match(text.strip()):
        return int(text)
    if "number" in types:
        try:
            n = float(text)
        except ValueError:
            pass
        else:
            if math.isfinite(n):
                return int(n) if _INT.match(text.strip()) else n
    if "boolean" in types and text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    if "null" in types and text in ("", "null"):
        return None
    return text


def _field(path: Iterable[Any], name: str = "") -> str:
    parts = [str(p) for p in path] + ([name] if name else [])
    return ".".join(parts) or "input"


def _type_words(expected: Any) -> str:
    kinds = [expected] if isinstance(expected, str) else list(expected)
    return " or ".join(_WORDS.get(k, k) for k in kinds)


def _messages(e: ValidationError) -> list[tuple[str, str]]:
    """(field, message) for one error of the validator."""
    kind, inst = e.validator, e.instance
    ctx: Any = e.validator_value
    if kind == "required":
        missing = [r for r in ctx if isinstance(inst, dict) and r not in inst]
        return [(_field(e.absolute_path, r), f"{_field(e.absolute_path, r)} is required") for r in missing]
    if kind in ("additionalProperties", "unevaluatedProperties") and isinstance(inst, dict):
        schema = e.schema if isinstance(e.schema, dict) else {}
        known = set(schema.get("properties", {}))
        patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
        extra = [k for k in inst if k not in known and not any(p.search(k) for p in patterns)]
        if extra:
            return [(_field(e.absolute_path, k), f"unknown field {_field(e.absolute_path, k)!r}: the service's input "
                     "has no such field") for k in extra]
    name = _field(e.absolute_path)
    if name == "input" and kind == "type":
        return [(name, "input must be a JSON object with the service's fields")]
    if kind == "type":
        if inst is None or inst == "":
            return [(name, f"{name} cannot be empty")]
        return [(name, f"{name} must be {_type_words(ctx)}")]
    if kind == "minLength":
        if ctx == 1:
            return [(name, f"{name} cannot be empty")]
        return [(name, f"{name} is too short: at least {ctx} characters")]
    if kind == "maxLength":
        return [(name, f"{name} is too long: at most {ctx} characters")]
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        return [(name, f"{name} is out of range: must be {op} {ctx}")]
    if kind == "enum":
        return [(name, f"{name} must be one of: {', '.join(json.dumps(v) for v in ctx)}")]
    if kind == "const":
        return [(name, f"{name} must be {json.dumps(ctx)}")]
    if kind == "format":
        return [(name, f"{name} must be {_FORMATS.get(ctx, 'in the ' + str(ctx) + ' format')}")]
    if kind == "pattern":
        return [(name, f"{name} does not match the pattern {ctx}")]
    if kind in ("minItems", "maxItems"):
        return [(name, f"{name} must have {'at least' if kind == 'minItems' else 'at most'} {ctx} items")]
    return [(name, f"{name}: {e.message}")]


def _refusal(errors: list[ValidationError]) -> InvalidInput:
    seen: dict[str, str] = {}  # one message per field, in the input's order of fields
    for e in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]):
        for name, msg in _messages(e):
            seen.setdefault(name, msg)
    first = next(iter(seen))
    return InvalidInput("; ".join(seen.values()), field=first)


def canonical(value: Any) -> bytes:
    """The input's bytes for a cache key: JSON with sorted keys (msgpack would refuse integers past
    64 bits, which a route passes on to its source)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
