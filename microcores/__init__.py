"""microcores: the microswarm SDK. Subclass `MicroCore` to publish a service; use `Client` to call one."""
from typing import TYPE_CHECKING, Any

from .core import MicroCore
from .errors import (CallCycle, Cancelled, DeadlineExceeded, DepthExceeded, InvalidInput, MicroError, NoData,
                     OutcomeUnknown, Overloaded, ServiceError, ServiceFailed, Unavailable,
                     UnknownService)

if TYPE_CHECKING:  # typed for checkers; loaded lazily at run time (__getattr__)
    from .client import Client, Envelope, publish

__version__ = "0.1.0"

__all__ = ["MicroCore", "Client", "Envelope", "publish", "MicroError", "InvalidInput", "UnknownService",
           "NoData", "CallCycle", "DepthExceeded", "DeadlineExceeded", "ServiceFailed", "ServiceError",
           "Unavailable",
           "Overloaded", "OutcomeUnknown", "Cancelled", "__version__"]


def __getattr__(name: str) -> Any:  # the client pulls in grpc: load it only when asked for
    if name in ("Client", "Envelope", "publish"):
        from . import client
        return getattr(client, name)
    raise AttributeError(name)
