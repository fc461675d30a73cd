"""Errors every microswarm part can raise or report.

Each carries a stable `code` (what scripts match on), a message for people, and the input
field at fault when there is one. The same triple travels on the wire as `Error`, with a
service's own failure's `details`: its traceback within its package (see `_worker.service_traceback`).
"""
from __future__ import annotations


class MicroError(Exception):
    """Base of the errors a call can end in."""

    code = "error"

    def __init__(self, message: str, *, field: str = "", code: str | None = None, details: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details  # a service_error's traceback (package-relative), else ""
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        d = {"code": self.code, "message": self.message}
        if self.field:
            d["field"] = self.field
        if self.details:
            d["details"] = self.details
        return d

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidInput(MicroError):
    code = "invalid_input"


class UnknownService(MicroError):
    code = "unknown_service"


class NoData(MicroError):
    """Raised by a service that found nothing for its input (the gateway answers 404)."""

    code = "no_data"


class CallCycle(MicroError):
    code = "cycle"


class DepthExceeded(MicroError):
    code = "depth_exceeded"


class DeadlineExceeded(MicroError):
    code = "deadline_exceeded"


class ServiceFailed(MicroError):
    """The service's own code raised: the answer, not an agent fault."""

    code = "service_error"


class ServiceError(ServiceFailed):
    """What clients raise for a `service_error`: `details` holds the service's traceback, its files
    named relative to its package (`except ServiceFailed` catches it too)."""


class Unavailable(MicroError):
    code = "unavailable"


class Overloaded(MicroError):
    """The coordinator's queue for volunteer slots is full: retry later (HTTP 503)."""

    code = "overloaded"


class OutcomeUnknown(MicroError):
    """A service that may not run twice started on an agent that then vanished or fell silent:
    it may or may not have taken effect, and it was not run again."""

    code = "outcome_unknown"


class Cancelled(MicroError):
    """The caller gave up on the call."""

    code = "cancelled"


class Unauthorized(MicroError):
    code = "unauthenticated"


class Forbidden(MicroError):
    code = "forbidden"


class TooLarge(MicroError):
    code = "too_large"


class ProtocolError(MicroError):
    """A peer broke the wire contract (bad frame, tampering, replay): the session ends."""

    code = "protocol_error"


class PackageError(MicroError):
    """A package failed verification or safe extraction."""

    code = "bad_package"


class UnknownCall(MicroError):
    """No submitted call of this client has that id (never submitted by it, or its result expired)."""

    code = "unknown_call"


BY_CODE: dict[str, type[MicroError]] = {
    cls.code: cls
    for cls in (InvalidInput, UnknownService, NoData, CallCycle, DepthExceeded, DeadlineExceeded,
                ServiceError, Unavailable, Overloaded, OutcomeUnknown, Cancelled, Unauthorized, Forbidden,
                TooLarge, ProtocolError, PackageError, UnknownCall)
}


def from_code(code: str, message: str, field: str = "", details: str = "") -> MicroError:
    """Rebuild the matching exception from a wire error."""
    cls = BY_CODE.get(code, MicroError)
    return cls(message, field=field, code=code, details=details)
