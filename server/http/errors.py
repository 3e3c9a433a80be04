"""The core's codes as HTTP status (one table), and OpenAI-shaped error bodies:
``{"error": {"message", "type", "param", "code"}}``. ``param`` names the body field (or
query/path parameter), ``code`` is the core's code in lower case."""

from __future__ import annotations

from sae_runtime.errors import SteeringError
from server.core.errors import Code, code_of, description_of, field_of
from server.http.bodies import body_field

HTTP_STATUS: dict[Code, tuple[int, str]] = {
    Code.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Code.NOT_FOUND: (400, "invalid_request_error"),  # an unknown SAE in the body
    Code.FAILED_PRECONDITION: (400, "invalid_request_error"),
    Code.UNAUTHENTICATED: (401, "authentication_error"),
    Code.PERMISSION_DENIED: (403, "permission_error"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    Code.CANCELLED: (499, "invalid_request_error"),
    Code.INTERNAL: (500, "server_error"),
    Code.UNAVAILABLE: (503, "service_unavailable_error"),
}
"""Core code -> (HTTP status, OpenAI error type)."""


class HttpError(Exception):
    """An HTTP answer with an error body. ``code`` is what the metrics count; ``status``
    may differ from ``HTTP_STATUS[code]`` for the door's own refusals (413, 415, 404...)."""

    def __init__(self, code: Code, message: str, param: str | None = None, *,
                 status: int | None = None, name: str | None = None) -> None:
        super().__init__(message)
        default, kind = HTTP_STATUS.get(code, (500, "server_error"))
        self.code = code
        self.status = status or default
        self.body = {"error": {"message": message, "type": kind, "param": param,
                               "code": name or code.value.lower()}}


def http_error(err: BaseException, table: dict | None = None) -> HttpError:
    """A domain error as an HttpError; its field path becomes the body's field through
    ``table`` (``server.http.bodies.field_table``; None: a query or path parameter, named
    as the core names it)."""
    code = code_of(err)
    field = field_of(err)
    if field is None:  # anything but a domain error is told as nothing more than this
        return HttpError(code, str(err) if isinstance(err, SteeringError) else "internal error")
    param = body_field(field, table) if table is not None else field
    return HttpError(code, f"{param}: {description_of(err)}", param)
