"""The core's status codes: every domain error maps to one ``Code`` here (one table); each
front door maps a ``Code`` to its own status (``server.grpc.errors``, ``server.http.errors``).

The codes are gRPC's canonical names, the API's own vocabulary (``steering.v1`` is the
source): both doors label the ``steerd_requests_total`` metric with them.
"""

from __future__ import annotations

import asyncio
from enum import Enum

from sae_runtime.errors import (
    EngineUnavailableError,
    InternalServerError,
    InvalidRequestError,
    NoChatTemplateError,
    NotLabelledError,
    ResourceLimitError,
    SteeringError,
    UnknownSAEError,
    UnknownVectorError,
)


class Code(Enum):
    """How a call ended (gRPC's canonical status names)."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class UnauthenticatedError(SteeringError):
    """The caller's bearer token is missing or wrong (``UNAUTHENTICATED``)."""


class PermissionDeniedError(SteeringError):
    """The caller may not make this call: an admin call without an admin token, or on a
    server with no admin tokens (``PERMISSION_DENIED``)."""


CODE_OF: dict[type[SteeringError], Code] = {
    InvalidRequestError: Code.INVALID_ARGUMENT,
    UnknownSAEError: Code.NOT_FOUND,
    UnknownVectorError: Code.NOT_FOUND,
    ResourceLimitError: Code.RESOURCE_EXHAUSTED,
    NotLabelledError: Code.FAILED_PRECONDITION,
    NoChatTemplateError: Code.FAILED_PRECONDITION,
    UnauthenticatedError: Code.UNAUTHENTICATED,
    PermissionDeniedError: Code.PERMISSION_DENIED,
    EngineUnavailableError: Code.UNAVAILABLE,
    InternalServerError: Code.INTERNAL,
}


def code_of(err: BaseException | None) -> Code:
    """The code a call ends with when ``err`` ends it (None: OK). A client that went away
    (cancellation, a closed generator) is CANCELLED; anything unexpected is INTERNAL."""
    if err is None:
        return Code.OK
    if isinstance(err, (asyncio.CancelledError, GeneratorExit)):
        return Code.CANCELLED
    for cls in type(err).__mro__:
        if cls in CODE_OF:
            return CODE_OF[cls]
    return Code.INTERNAL


def field_of(err: BaseException) -> str | None:
    """The request field an error names (a dotted proto path, ``interventions[2].feature``)."""
    return getattr(err, "field", None)


def description_of(err: BaseException) -> str:
    """The error's message without its field prefix (``str(err)`` is ``field: description``)."""
    desc = getattr(err, "description", None)
    return desc if desc is not None else str(err)
