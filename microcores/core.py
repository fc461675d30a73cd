"""`MicroCore`: what a developer subclasses to publish a service.

A service is a class with a `group.function` name, a version, typed input and output models
(pydantic), and `process()`. The coordinator validates input from those types before any
agent sees it; agents run `process()` in an isolated worker; `self.call()` reaches another
service through the coordinator (the paper's ExtendedService).
"""
from __future__ import annotations

import contextvars
import inspect
import re
from typing import Any, ClassVar, Generic, Protocol, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .errors import InvalidInput, MicroError, Unavailable

InT = TypeVar("InT", bound=BaseModel)
OutT = TypeVar("OutT", bound=BaseModel)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}\.[a-z][a-z0-9_]{0,62}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")

# Set by the worker around `process()`: how nested calls reach the coordinator.
current_caller: contextvars.ContextVar["NestedCaller | None"] = contextvars.ContextVar(
    "microswarm_caller", default=None)


# Set by the worker around `process()`: where `self.progress()` goes (None: nowhere, a no-op).
current_progress: contextvars.ContextVar["ProgressSink | None"] = contextvars.ContextVar(
    "microswarm_progress", default=None)

MAX_PROGRESS_MESSAGE = 200  # characters of a progress message


class ProgressSink(Protocol):
    """Interface the worker provides for `MicroCore.progress` (rate-limited there)."""

    def report(self, fraction: float, message: str) -> None:  # pragma: no cover
        raise NotImplementedError


def clean_progress(fraction: Any, message: Any) -> tuple[float, str]:
    """A fraction clamped to 0..1 (0 for NaN or not a number) and a message of at most
    MAX_PROGRESS_MESSAGE characters."""
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        f = 0.0
    if f != f:  # NaN
        f = 0.0
    return min(1.0, max(0.0, f)), str(message or "")[:MAX_PROGRESS_MESSAGE]


class NestedCaller(Protocol):
    """Interface the worker provides for `MicroCore.call` (kept abstract so the SDK stays light)."""

    def call(self, service: str, data: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError


class MicroCore(Generic[InT, OutT]):
    """Subclass with `MicroCore[In, Out]`, set `name`, and implement `process`."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    pure: ClassVar[bool] = False        # same input, same output, no side effects: cacheable
    idempotent: ClassVar[bool] = False  # safe to run again on another agent after a failure
    timeout: ClassVar[float] = 30.0     # seconds one run may take
    cache: ClassVar[bool] = True        # per-service opt-out of the result cache (pure services only)
    cache_ttl: ClassVar[float | None] = None
    network: ClassVar[bool] = False     # its workers may open network connections (else: none)
    input_model: ClassVar[type[BaseModel]]
    output_model: ClassVar[type[BaseModel]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            if get_origin(base) is MicroCore or (isinstance(get_origin(base), type)
                                                 and issubclass(get_origin(base), MicroCore)):
                args = get_args(base)
                if len(args) == 2 and all(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
                    cls.input_model, cls.output_model = args
        if not cls.__dict__.get("name"):
            return  # an abstract intermediate class
        problem = definition_problem(cls)
        if problem:
            raise ServiceDefinitionError(f"{_where_defined(cls)}: {problem}")

    # -- what developers implement and call

    def process(self, data: InT) -> OutT:
        raise NotImplementedError(f"{type(self).__qualname__} does not implement process()")

    def call(self, service: str | type[MicroCore[Any, Any]], data: BaseModel | dict[str, Any]) -> Any:
        """Call another service through the coordinator, with this call's chain and deadline.

        Given a MicroCore class, returns its output model; given a name, a plain dict.
        """
        caller = current_caller.get()
        if caller is None:
            raise Unavailable("self.call() only works while the service runs inside microswarm; "
                              "outside it use microcores.Client")
        name = service if isinstance(service, str) else service.name
        payload = data.model_dump(mode="python") if isinstance(data, BaseModel) else dict(data)
        result = caller.call(name, payload)
        if isinstance(service, type):
            return service.output_model.model_validate(result)
        return result

    def progress(self, fraction: float, message: str = "") -> None:
        """Tell the caller how far this job is: `fraction` (clamped to 0..1) and a short message (at
        most 200 characters). Cheap to call often: at most ~10 updates a second leave the worker,
        and the last one always does (at most 100 ms late). Outside microswarm it does nothing."""
        sink = current_progress.get()
        if sink is not None:
            f, m = clean_progress(fraction, message)
            sink.report(f, m)

    # -- what the runtime uses

    @classmethod
    def validate_input(cls, raw: Any) -> InT:
        value: InT = validate_model(cls.input_model, raw)
        return value

    @classmethod
    def validate_output(cls, raw: Any) -> OutT:
        try:
            if isinstance(raw, cls.output_model):
                return raw  # type: ignore[return-value]
            return cls.output_model.model_validate(raw)  # type: ignore[return-value]
        except ValidationError as exc:
            err = validation_error(exc)
            raise MicroError(f"{cls.name} returned an output that does not match "
                             f"{cls.output_model.__name__}: {err.message}", code="bad_output",
                             field=err.field) from None

    def run(self, raw: Any) -> dict[str, Any]:
        """Validate, process, check the output: one job, as a worker runs it."""
        out = self.validate_output(self.process(self.validate_input(raw)))
        return out.model_dump(mode="python")

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name, "version": str(cls.version), "pure": bool(cls.pure),
            "idempotent": bool(cls.idempotent), "timeout": float(cls.timeout),
            "cache": bool(cls.cache), "cache_ttl": cls.cache_ttl,
            "description": (cls.__doc__ or "").strip().split("\n\n")[0],
            "input_schema": cls.input_model.model_json_schema(),
            "output_schema": cls.output_model.model_json_schema(),
            # only when set: a package that does not ask for the network keeps the digest it had
            **({"network": True} if cls.network else {}),
        }


class ServiceDefinitionError(TypeError, ValueError):
    """A MicroCore subclass that cannot be a service (its name, version, models or timeout): one
    line naming the class and the file (a ValueError too, so `microswarm publish` says it so)."""


def definition_problem(cls: type[MicroCore[Any, Any]]) -> str:
    """What is wrong with a service class's declaration, in one line ("" when nothing is)."""
    if not isinstance(cls.name, str) or not NAME_RE.match(cls.name):
        return (f"name {cls.name!r} must look like 'group.function' "
                "(lower case letters, digits and underscores, one dot)")
    if not VERSION_RE.match(str(cls.version)):
        return (f"version {cls.version!r} must be 1-64 characters "
                "of letters, digits, '.', '_', '+' or '-'")
    if not hasattr(cls, "input_model") or not hasattr(cls, "output_model"):
        return ("it must declare its models: class "
                f"{cls.__name__}(MicroCore[InputModel, OutputModel])")
    try:
        timeout = float(cls.timeout)
    except (TypeError, ValueError):
        timeout = -1.0
    if not (0 < timeout <= 24 * 3600):
        return f"timeout {cls.timeout!r} must be between 0 and 86400 seconds"
    return ""


def _where_defined(cls: type) -> str:
    """`file:line` of a class statement being run (called from __init_subclass__), or its file."""
    import os
    import sys
    path, line = "", 0
    try:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name == "__init_subclass__":
            frame = frame.f_back  # type: ignore[assignment]
        if frame is not None:
            path, line = frame.f_code.co_filename, frame.f_lineno
    except (AttributeError, ValueError):
        pass
    module = sys.modules.get(cls.__module__)
    mfile = getattr(module, "__file__", None) or ""
    if mfile and os.path.realpath(path) != os.path.realpath(mfile):  # built elsewhere (type(...)): its module's file
        path, line = mfile, 0
    if not path:
        return f"class {cls.__qualname__}"
    path = _relative(path)
    return f"{path}:{line}: class {cls.__qualname__}" if line else f"{path}: class {cls.__qualname__}"


def check_definition(cls: type[MicroCore[Any, Any]]) -> None:
    """Raise ServiceDefinitionError for a class that cannot be published (e.g. a name changed after it
    was defined), naming the class and its file."""
    problem = definition_problem(cls)
    if problem:
        import inspect
        try:
            path = inspect.getsourcefile(cls) or ""
        except (TypeError, OSError):
            path = ""
        where = f"{_relative(path)}: class {cls.__qualname__}" if path else f"class {cls.__qualname__}"
        raise ServiceDefinitionError(f"{where}: {problem}")


def _relative(path: str) -> str:
    import os
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def validate_model(model: type[BaseModel], raw: Any) -> Any:
    """Validate a dict (msgpack) or raw JSON bytes (which honours the model's JSON options).

    Fields the model does not have are refused (`unknown field 'x'`), unless its config says what
    to do with extras (`extra="allow"`, or `"ignore"` set on purpose)."""
    if not isinstance(raw, (bytes, bytearray)) and not isinstance(raw, dict):
        raise InvalidInput(f"input must be a JSON object with the fields of {model.__name__}, "
                           f"not {type(raw).__name__}")
    json_in = isinstance(raw, (bytes, bytearray))
    refuse = model.model_config.get("extra") is None
    if refuse and _EXTRA_OVERRIDE:
        try:
            return _validate(model, raw, json_in, "forbid")
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        # the override reaches nested models too: theirs keep their own say over their extras
        if not any(e.get("type") == "extra_forbidden" and len(e.get("loc", ())) > 1 for e in errors):
            raise validation_error(errors) from None
        unknown: list[Any] = [e for e in errors if e.get("type") == "extra_forbidden" and len(e.get("loc", ())) == 1]
        try:
            value = _validate(model, raw, json_in, None)
        except ValidationError as exc:
            raise validation_error(exc.errors(include_url=False) + unknown) from None
        if unknown:
            raise validation_error(unknown)
        return value
    unknown = _unknown_keys(model, raw) if refuse else []  # a pydantic without the per-call override
    try:
        value = _validate(model, raw, json_in, None)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False) + unknown) from None
    if unknown:
        raise validation_error(unknown)
    return value


def _unknown_keys(model: type[BaseModel], raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, dict):
        keys = list(raw)
    else:
        from pydantic_core import from_json
        try:
            obj = from_json(raw)
        except ValueError:
            return []  # not JSON: validation says so
        keys = list(obj) if isinstance(obj, dict) else []
    known: set[str] = set()
    for name, f in model.model_fields.items():
        known.update(a for a in (name, f.alias, f.validation_alias) if isinstance(a, str))
    return [{"type": "extra_forbidden", "loc": (k,), "input": None} for k in keys if k not in known]


def _validate(model: type[BaseModel], raw: Any, json_in: bool, extra: Any) -> Any:
    kw = {"extra": extra} if extra else {}
    return model.model_validate_json(raw, **kw) if json_in else model.model_validate(raw, **kw)


_EXTRA_OVERRIDE = "extra" in inspect.signature(BaseModel.model_validate).parameters  # pydantic >= 2.11


_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "bytes": "bytes", "list": "a list", "dict": "an object", "decimal": "a number",
}


def validation_error(exc: ValidationError | list[Any]) -> InvalidInput:
    """Turn pydantic's report into one message per field, in the gateway's words."""
    messages: list[str] = []
    first_field = ""
    errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else exc
    for e in errors:
        field = ".".join(str(p) for p in e.get("loc", ())) or "input"
        first_field = first_field or field
        kind = e.get("type", "")
        ctx = e.get("ctx") or {}
        if kind == "json_invalid":
            msg = f"input is not valid JSON: {ctx.get('error', e.get('msg'))}"
        elif kind in ("model_type", "model_attributes_type", "dict_type") and field == "input":
            msg = "input must be a JSON object with the service's fields"
        elif kind == "missing":
            msg = f"{field} is required"
        elif kind == "extra_forbidden":
            msg = f"unknown field {field!r}: the service's input has no such field"
        elif (kind == "string_too_short" and ctx.get("min_length") == 1) or (
                field != "input" and (e.get("input") is None or e.get("input") == "")):
            msg = f"{field} cannot be empty"  # absent, null or "" where a value is needed
        elif kind == "int_from_float":
            msg = f"{field} must be an integer"
        elif kind.startswith("date_from_datetime"):
            msg = f"{field} must be a date in YYYY-MM-DD format"
        elif kind.endswith("_parsing") or kind.endswith("_type"):
            base = kind.rsplit("_", 1)[0]
            if base.startswith(("date", "time")):
                base = "datetime" if base.startswith("datetime") else base.split("_")[0]
                fmt = {"date": "YYYY-MM-DD", "datetime": "YYYY-MM-DDTHH:MM:SS", "time": "HH:MM:SS"}.get(base, "ISO 8601")
                msg = f"{field} must be a {base} in {fmt} format"
            elif base in _TYPE_WORDS:
                msg = f"{field} must be {_TYPE_WORDS[base]}"
            else:
                msg = f"{field}: {e.get('msg', 'invalid value')}"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
                  "less_than_equal": "<="}[kind]
            bound = next(iter(ctx.values()), "?")
            msg = f"{field} is out of range: must be {op} {bound}"
        else:
            msg = f"{field}: {e.get('msg', 'invalid value')}"
        messages.append(msg)
    return InvalidInput("; ".join(messages), field=first_field)
