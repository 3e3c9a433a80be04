"""The gRPC door: ``steering.v1.SteeringService`` over the core.

Each method converts the request (``server.grpc.convert``), calls the core, converts the
answer back, and maps a domain error to its status (``server.grpc.errors``); anything
unexpected is logged and answered INTERNAL with no detail. Every call is counted once in
``steerd_requests_total{door="grpc"}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import DecodeError

from sae_runtime.errors import InternalServerError, SteeringError
from server.auth import Auth
from server.core.errors import Code
from server.core.types import Caller
from server.grpc import convert
from server.grpc.errors import abort_with
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # the core imports vLLM: the door is built before the engine starts
    from server.core.service import Core

log = logging.getLogger("steerd")
DOOR = "grpc"
T = TypeVar("T")


def authorization(context: grpc.aio.ServicerContext) -> str:
    return next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")


class SteeringServicer(pb_grpc.SteeringServiceServicer):
    def __init__(self, core: Core, auth: Auth | None = None) -> None:
        self.core = core
        self.auth = auth or Auth()
        self.metrics = core.metrics

    def _caller(self, context) -> Caller:
        return self.auth.caller(authorization(context)) if self.auth.on else self.auth.caller("")

    async def _abort(self, context, method: str, err: Exception) -> None:
        if not isinstance(err, SteeringError):
            log.error("%s failed", method, exc_info=err)
            err = InternalServerError("internal error")
        await abort_with(context, err)

    async def _parse(self, request, cls, method: str, context):
        """``request`` as ``cls``: ``add_servicer`` hands the raw bytes (so a message gRPC
        could not parse, e.g. invalid UTF-8 in a string, is INVALID_ARGUMENT with the
        parser's reason instead of INTERNAL); the generated registration hands messages."""
        if not isinstance(request, bytes):
            return request
        try:
            return cls.FromString(request)
        except DecodeError as e:
            self.metrics.call(method, DOOR).end(code=Code.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request is not a valid {cls.DESCRIPTOR.full_name}: {e}")

    async def _unary(self, method: str, request, cls, context,
                     work: Callable[[object], Awaitable[T]], empty: T) -> T:
        request = await self._parse(request, cls, method, context)
        call = self.metrics.call(method, DOOR)
        try:
            out = await work(request)
        except asyncio.CancelledError as e:
            call.end(e)
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status
            call.end(e)
            await self._abort(context, method, e)
            return empty
        call.end()
        return out

    async def Generate(self, request: pb.GenerateRequest | bytes,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        request = await self._parse(request, pb.GenerateRequest, "Generate", context)
        call = self.metrics.call("Generate", DOOR)
        try:
            stream = await self.core.generate(convert.generate_request(request),
                                              self._caller(context))
        except asyncio.CancelledError as e:
            call.end(e)
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status
            call.end(e)
            await self._abort(context, "Generate", e)
            return
        try:
            async for chunk in stream:
                yield convert.chunk(chunk)
        except (asyncio.CancelledError, GeneratorExit) as e:
            call.end(e)
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status
            call.end(e)
            await self._abort(context, "Generate", e)
        finally:
            await stream.aclose()
            call.end()

    async def Encode(self, request: pb.EncodeRequest | bytes, context) -> pb.EncodeResponse:
        async def work(req):
            results = await self.core.encode(convert.encode_request(req), self._caller(context))
            return pb.EncodeResponse(results=[convert.encode_result(r) for r in results])

        return await self._unary("Encode", request, pb.EncodeRequest, context, work,
                                 pb.EncodeResponse())

    async def ListSAEs(self, request, context) -> pb.ListSAEsResponse:
        async def work(req):
            return pb.ListSAEsResponse(saes=[convert.sae_info(s) for s in self.core.list_saes()])

        return await self._unary("ListSAEs", request, pb.ListSAEsRequest, context, work,
                                 pb.ListSAEsResponse())

    async def GetFeature(self, request: pb.GetFeatureRequest | bytes, context) -> pb.Feature:
        async def work(req):
            return convert.feature(await self.core.get_feature(req.sae, req.index))

        return await self._unary("GetFeature", request, pb.GetFeatureRequest, context, work,
                                 pb.Feature())

    async def SearchFeatures(self, request: pb.SearchFeaturesRequest | bytes,
                             context) -> pb.SearchFeaturesResponse:
        async def work(req):
            found = self.core.search_features(req.query, req.sae, req.limit)
            return pb.SearchFeaturesResponse(features=[convert.feature(f) for f in found])

        return await self._unary("SearchFeatures", request, pb.SearchFeaturesRequest, context,
                                 work, pb.SearchFeaturesResponse())

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        async def work(req):
            return convert.model_info(self.core.model_info())

        return await self._unary("GetModelInfo", request, pb.GetModelInfoRequest, context, work,
                                 pb.GetModelInfoResponse())

    # ---- runtime vectors: admin calls take admin tokens only (``Auth.check_admin``)

    async def LoadVector(self, request, context) -> pb.LoadVectorResponse:
        async def work(req):
            self.auth.check_admin(authorization(context))
            v = await self.core.load_vector(convert.load_vector_request(req))
            return pb.LoadVectorResponse(vector=convert.vector_info(v))

        return await self._unary("LoadVector", request, pb.LoadVectorRequest, context, work,
                                 pb.LoadVectorResponse())

    async def UnloadVector(self, request, context) -> pb.UnloadVectorResponse:
        async def work(req):
            self.auth.check_admin(authorization(context))
            return pb.UnloadVectorResponse(
                vector=convert.vector_info(self.core.unload_vector(req.name)))

        return await self._unary("UnloadVector", request, pb.UnloadVectorRequest, context,
                                 work, pb.UnloadVectorResponse())

    async def ListVectors(self, request, context) -> pb.ListVectorsResponse:
        async def work(req):
            return pb.ListVectorsResponse(
                vectors=[convert.vector_info(v) for v in self.core.list_vectors()])

        return await self._unary("ListVectors", request, pb.ListVectorsRequest, context, work,
                                 pb.ListVectorsResponse())

    async def ExportVector(self, request, context) -> pb.ExportVectorResponse:
        async def work(req):
            data, v = await self.core.export_vector(req.name)
            return pb.ExportVectorResponse(gguf=data, vector=convert.vector_info(v))

        return await self._unary("ExportVector", request, pb.ExportVectorRequest, context, work,
                                 pb.ExportVectorResponse())

    async def TrainVector(self, request, context) -> pb.TrainVectorResponse:
        async def work(req):
            self.auth.check_call(authorization(context), admin=req.register)
            r = await self.core.train_vector(convert.train_vector_request(req),
                                             self._caller(context))
            return convert.train_vector_response(r)

        return await self._unary("TrainVector", request, pb.TrainVectorRequest, context, work,
                                 pb.TrainVectorResponse())
