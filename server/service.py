"""The gRPC servicer: validate, convert, call the engine, stream back.

It holds no model math; conversions live in ``server.convert``, engine calls in
``sae_runtime.vllm.engine``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from sae_runtime.errors import SteeringError
from sae_runtime.saes.base import SAEConfig
from sae_runtime.vllm import engine as eng
from server import convert
from server.errors import abort_with
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc as pb_grpc

log = logging.getLogger("steerd")


class SteeringServicer(pb_grpc.SteeringServiceServicer):
    def __init__(
        self,
        engine: Any,
        *,
        model: str,
        saes: Mapping[str, SAEConfig],
        max_interventions: int,
        compiled: bool,
        on_engine_dead: Any = None,
    ) -> None:
        self.engine = engine
        self.model = model
        self.saes = dict(saes)
        self.sae_index = {sid: i for i, sid in enumerate(self.saes)}
        self.max_interventions = max_interventions
        self.compiled = compiled
        self.on_engine_dead = on_engine_dead or (lambda: None)
        mc = engine.model_config
        self.vocab_size = mc.get_vocab_size()
        self.max_model_len = mc.max_model_len
        self.tokenizer = engine.get_tokenizer()
        self.active_streams = 0

    # ------------------------------------------------------------------ Generate

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            inputs = convert.generate_inputs_from_pb(
                request, saes=self.saes, max_interventions=self.max_interventions,
                vocab_size=self.vocab_size,
            )
            ids = list(inputs.prompt_ids or self.tokenizer.encode(inputs.prompt_text))
            if not ids:
                from sae_runtime.errors import InvalidRequestError

                raise InvalidRequestError("prompt.text", "tokenizes to zero tokens")
            convert.check_lengths(len(ids), inputs.max_tokens, self.max_model_len)
        except SteeringError as e:
            await abort_with(context, e)
            return

        engine_id = uuid.uuid4().hex
        shown_id = inputs.request_id or engine_id
        params = eng.make_sampling_params(
            max_tokens=inputs.max_tokens, temperature=inputs.temperature, top_p=inputs.top_p,
            top_k=inputs.top_k, seed=inputs.seed, stop=list(inputs.stop),
            stop_token_ids=list(inputs.stop_token_ids), ignore_eos=inputs.ignore_eos,
            spec=inputs.spec, sae_index=self.sae_index,
        )
        log.info("generate request_id=%s prompt_tokens=%d max_tokens=%d interventions=%d",
                 shown_id, len(ids), inputs.max_tokens, len(inputs.spec.interventions))
        self.active_streams += 1
        finished = False
        position = len(ids)
        try:
            first = True
            async for out in self.engine.generate(eng.make_prompt(ids, inputs.spec), params, engine_id):
                c = out.outputs[0]
                msg = pb.GenerateResponse(
                    request_id=shown_id, token_ids=list(c.token_ids), text=c.text,
                    first_position=position,
                )
                position += len(c.token_ids)
                if first:
                    msg.prompt_token_ids.extend(ids)
                    first = False
                if out.finished:
                    finished = True
                    msg.finish_reason = convert.finish_reason_to_pb(c.finish_reason)
                    msg.usage.CopyFrom(pb.Usage(
                        prompt_tokens=len(ids), completion_tokens=position - len(ids),
                        cached_prompt_tokens=out.num_cached_tokens or 0,
                    ))
                yield msg
        except asyncio.CancelledError:
            log.info("generate request_id=%s cancelled by client", shown_id)
            raise
        except Exception as e:  # noqa: BLE001 - mapped below, never leaked
            if _engine_dead(e):
                self.on_engine_dead()
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine stopped; retry later")
            log.exception("generate request_id=%s failed", shown_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request_id {shown_id})")
        finally:
            self.active_streams -= 1
            if not finished:
                await self.engine.abort(engine_id)

    # ------------------------------------------------------------------ info

    async def ListSAEs(self, request, context) -> pb.ListSAEsResponse:
        return pb.ListSAEsResponse(
            saes=[convert.sae_info_to_pb(sid, cfg) for sid, cfg in self.saes.items()]
        )

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        mc = self.engine.model_config
        hf = mc.hf_config
        return pb.GetModelInfoResponse(
            model=self.model,
            architecture=(getattr(hf, "architectures", None) or [""])[0],
            num_layers=mc.get_num_layers(self.engine.vllm_config.parallel_config),
            hidden_size=mc.get_hidden_size(),
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            max_interventions=self.max_interventions,
            dtype=str(mc.dtype).removeprefix("torch."),
            compiled=self.compiled,
        )


def _engine_dead(e: BaseException) -> bool:
    return type(e).__name__ == "EngineDeadError"
