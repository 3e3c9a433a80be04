"""The core's codes as gRPC status (one table), and the abort helper."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.core.errors import Code, code_of, field_of

STATUS_OF: dict[Code, grpc.StatusCode] = {code: getattr(grpc.StatusCode, code.value) for code in Code}
"""Core code -> gRPC status: the core's codes are gRPC's names."""


def status_code_of(err: BaseException) -> grpc.StatusCode:
    return STATUS_OF[code_of(err)]


async def abort_with(context: grpc.aio.ServicerContext, err: BaseException) -> None:
    """Abort the RPC with the mapped status; bad fields travel as google.rpc.BadRequest."""
    code = status_code_of(err)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=str(err))
    field = field_of(err)
    if field is not None:
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=str(err))
            ]
        )
        status.details.add().Pack(detail)
    await context.abort_with_status(rpc_status.to_status(status))
