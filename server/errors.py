"""One table from domain errors to gRPC status codes, and the abort helper."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from sae_runtime.errors import (
    EngineUnavailableError,
    InternalServerError,
    InvalidRequestError,
    NoChatTemplateError,
    NotLabelledError,
    ResourceLimitError,
    SteeringError,
    UnknownSAEError,
)

STATUS_OF: dict[type[SteeringError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownSAEError: grpc.StatusCode.NOT_FOUND,
    ResourceLimitError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotLabelledError: grpc.StatusCode.FAILED_PRECONDITION,
    NoChatTemplateError: grpc.StatusCode.FAILED_PRECONDITION,
    EngineUnavailableError: grpc.StatusCode.UNAVAILABLE,
    InternalServerError: grpc.StatusCode.INTERNAL,
}


def status_code_of(err: SteeringError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, err: SteeringError) -> None:
    """Abort the RPC with the mapped status; bad fields travel as google.rpc.BadRequest."""
    code = status_code_of(err)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=str(err))
    field = getattr(err, "field", None)
    if field is not None:
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=str(err))
            ]
        )
        status.details.add().Pack(detail)
    await context.abort_with_status(rpc_status.to_status(status))
