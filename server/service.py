"""The gRPC servicer: validate, convert, call the engine, stream back.

It holds no model math; conversions live in ``server.convert``, engine calls in
``sae_runtime.vllm.engine``, read routing in ``server.reads``.

Generation is split into ``prepare_generate`` (validation, tokenization, caps) and
``generate_stream`` (the engine call, reads, logprobs, metrics), both raising domain errors.
The gRPC ``Generate`` and the OpenAI-compatible HTTP front end (``server.openai_api``) call
the same two, so validation, caps and metrics have one definition.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np

from sae_runtime.errors import (
    EngineUnavailableError,
    InternalServerError,
    InvalidRequestError,
    ResourceLimitError,
    SteeringError,
)
from sae_runtime.labels.store import FeatureLabels
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.guardrails import GuardSpec
from sae_runtime.spec.interventions import SteeringSpec
from sae_runtime.spec.reads import Read, ReadScope, ReadSpec
from sae_runtime.spec.vectors import VectorIndex, is_bank
from sae_runtime.vllm import engine as eng
from server import convert
from server.errors import abort_with
from server.logs import check_printable
from server.metrics import Metrics
from server.reads import ReadRouter, RequestReads
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc as pb_grpc

log = logging.getLogger("steerd")

READ_WAIT_S = 30.0  # how long a finished request waits for its last reads from the worker


def _accounted(method: str):
    """Record the RPC's final status code in ``steerd_requests{method, code}``."""

    def deco(fn):
        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def stream(self, request, context):
                exc = None
                try:
                    async for msg in fn(self, request, context):
                        yield msg
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    self.metrics.requests.labels(method, _final_code(context, exc)).inc()

            return stream

        @functools.wraps(fn)
        async def unary(self, request, context):
            exc = None
            try:
                return await fn(self, request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                self.metrics.requests.labels(method, _final_code(context, exc)).inc()

        return unary

    return deco


def _final_code(context, exc: BaseException | None) -> str:
    """The status an RPC ended with: the client went away, an abort's code, or OK."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # GeneratorExit: closed at a yield
        return "CANCELLED"
    code = context.code()
    if code is None:
        return "OK" if exc is None else "UNKNOWN"
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name


class SteeringServicer(pb_grpc.SteeringServiceServicer):
    def __init__(
        self,
        engine: Any,
        *,
        model: str,
        saes: Mapping[str, SAEConfig],
        limits: convert.Limits,
        compiled: bool,
        router: ReadRouter | None = None,
        on_engine_dead: Any = None,
        sae_dtypes: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
        max_concurrent_streams: int = 256,
        max_distinct_configs: int = 64,
        labels: Mapping[str, FeatureLabels] | None = None,
        chat_template: str | None = None,
        max_stream_buffer_bytes: int = 8 * 1024 * 1024,
        vectors: VectorIndex | None = None,
    ) -> None:
        self.engine = engine
        self.vectors = vectors or VectorIndex({})  # steering vectors: name -> layer -> bank row
        self.model = model
        self.saes = dict(saes)
        self.sae_index = {sid: i for i, sid in enumerate(self.saes)}
        self.labels = dict(labels or {})
        self.limits = limits
        self.compiled = compiled
        self.router = router
        self.sae_dtypes = dict(sae_dtypes or {})  # SAE id -> compute dtype the workers chose
        self.on_engine_dead = on_engine_dead or (lambda: None)
        self.max_model_len = engine.model_config.max_model_len
        self.tokenizer = engine.get_tokenizer()
        self.chat_template = chat_template  # --chat-template override; None: the tokenizer's
        self.metrics = metrics or Metrics()
        self.max_concurrent_streams = max_concurrent_streams
        self.max_distinct_configs = max_distinct_configs
        self.max_stream_buffer_bytes = max_stream_buffer_bytes
        self.active_streams = 0
        self.configs: Counter[str] = Counter()  # cache salt -> in-flight requests using it
        m = self.metrics
        m.active_streams.set_function(lambda: self.active_streams)
        m.distinct_configs.set_function(lambda: len(self.configs))
        m.read_buffers.set_function(lambda: self.router.in_flight if self.router else 0)
        m.engine_requests.set_function(engine.get_num_unfinished_requests)

    def _check_room(self) -> None:
        """Refuse a call when every stream slot is taken (before any parsing or tokenizing,
        so a flood of excess calls costs the server next to nothing)."""
        if self.active_streams >= self.max_concurrent_streams:
            self.metrics.rejected.labels("concurrent_streams").inc()
            raise ResourceLimitError(
                f"the server is at its limit of {self.max_concurrent_streams} concurrent "
                "streams; retry later")

    def _admit(self, spec: SteeringSpec) -> Callable[[], None]:
        """Take a stream slot (and a distinct-config slot) or raise ResourceLimitError.

        Returns the function that gives them back; calling it again does nothing.
        """
        self._check_room()
        salt = spec.cache_salt()
        if salt is not None and salt not in self.configs and len(self.configs) >= self.max_distinct_configs:
            self.metrics.rejected.labels("distinct_configs").inc()
            raise ResourceLimitError(
                f"{self.max_distinct_configs} distinct intervention sets are in flight (the "
                "server's cap); retry later or reuse an in-flight set")
        self.active_streams += 1
        if salt is not None:
            self.configs[salt] += 1
        held = True

        def release() -> None:
            nonlocal held
            if not held:
                return
            held = False
            self.active_streams -= 1
            if salt is not None:
                self.configs[salt] -= 1
                if not self.configs[salt]:
                    del self.configs[salt]

        return release

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None or bool(getattr(self.tokenizer, "chat_template", None))

    def _tokens(self, prompt: convert.PromptInput, field: str) -> list[int]:
        """The prompt's token ids: as given, tokenized text, or rendered chat messages."""
        if prompt.messages is not None:
            out = convert.render_chat(self.tokenizer, prompt.messages, self.chat_template,
                                      self.model, field)
        elif prompt.ids is not None:
            out = list(prompt.ids)
        else:
            out = list(self.tokenizer.encode(prompt.text))
        if not out:
            kind = "messages" if prompt.messages is not None else "text"
            raise InvalidRequestError(f"{field}.{kind}", "tokenizes to zero tokens")
        return out

    def _text_upto(self, generated: list[int], sent: str) -> str:
        """The text of ``generated`` past what was already sent as ``sent`` (a guardrail
        cut the engine's delta short, so its text is decoded here, as vLLM decodes it)."""
        full = self.tokenizer.decode(generated, skip_special_tokens=True)
        return full[len(sent):] if full.startswith(sent) else ""

    def _check_engine(self) -> None:
        if getattr(self.engine, "errored", False):
            raise EngineUnavailableError("the engine stopped; retry later")

    async def _run(self, ids: list[int], params: Any, spec: SteeringSpec, engine_id: str,
                   shown_id: str = "") -> AsyncIterator[Any]:
        """Engine outputs of one request; aborts the engine request if left early.

        Engine death raises EngineUnavailableError, anything else InternalServerError (logged
        here, with only the request id in the message). ``shown_id`` is the id the caller
        knows (their request_id), used in messages and logs.
        """
        shown_id = shown_id or engine_id
        finished = False
        try:
            async for out in self.engine.generate(eng.make_prompt(ids, spec), params, engine_id):
                finished = out.finished
                yield out
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped, never leaked
            if type(e).__name__ == "EngineDeadError":
                self.on_engine_dead()
                raise EngineUnavailableError("the engine stopped; retry later") from None
            log.exception("request %s failed in the engine", shown_id,
                          extra={"request_id": shown_id})
            raise InternalServerError(f"internal error (request_id {shown_id})") from None
        finally:
            if not finished:
                try:
                    await self.engine.abort(engine_id)
                except Exception:  # noqa: BLE001 - a dead engine must not mask the status above
                    log.debug("abort of %s failed", engine_id, exc_info=True)

    # ------------------------------------------------------------------ Generate

    @_accounted("Generate")
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            admitted = self.prepare_generate(request)
        except SteeringError as e:
            await abort_with(context, e)
            return
        try:
            async for msg in self.generate_stream(admitted):
                yield msg
        except SteeringError as e:
            await abort_with(context, e)

    def prepare_generate(self, request: pb.GenerateRequest, *,
                         default_max_tokens_to_fit: bool = False) -> Admitted:
        """Validate, tokenize (or render the chat), check lengths, and take a stream slot.

        Raises a SteeringError (the request is refused) or returns an ``Admitted`` whose slot
        ``generate_stream`` gives back. With ``default_max_tokens_to_fit``, an unset
        ``max_tokens`` means whatever the context (and --max-new-tokens) allows, as in
        OpenAI's chat API.
        """
        self._check_engine()
        self._check_room()
        inputs = convert.generate_inputs_from_pb(request, saes=self.saes, limits=self.limits,
                                                 vectors=self.vectors)
        check_printable("request_id", inputs.request_id)
        prompt = convert.PromptInput(inputs.prompt_text, inputs.prompt_ids, inputs.prompt_messages)
        ids = self._tokens(prompt, "prompt")
        if default_max_tokens_to_fit and not request.sampling.HasField("max_tokens"):
            room = max(self.max_model_len - len(ids), 1)
            inputs = replace(inputs, max_tokens=min(room, self.limits.max_new_tokens or room))
        convert.check_lengths(len(ids), inputs.max_tokens, self.max_model_len, self.limits)
        return Admitted(inputs, ids, self._admit(inputs.spec))

    async def generate_stream(self, admitted: Admitted) -> AsyncIterator[pb.GenerateResponse]:
        """Run an admitted request; releases its slot when the stream ends (or is closed).

        The engine side runs in its own task and hands messages over through an ``_Outbox``,
        so a client that stops reading stalls only this generator (its write waits on the
        connection's flow control), not the engine request. What piles up in between is
        capped at ``max_stream_buffer_bytes``: past it the engine request is aborted, its
        reads and unsent messages dropped, its slot given back, and the stream ends with
        RESOURCE_EXHAUSTED as soon as the client takes what its window already holds.
        """
        engine_id = uuid.uuid4().hex
        box = _Outbox(self.max_stream_buffer_bytes)
        producer = asyncio.create_task(self._produce(
            self._generate(admitted.inputs, admitted.ids, engine_id), box, admitted.release,
            admitted.inputs.request_id or engine_id))
        try:
            while (item := await box.get()) is not None:
                msg, size = item
                yield msg  # returns once the transport has taken the message
                box.sent(size)
        finally:
            producer.cancel()
            admitted.release()
            await asyncio.wait([producer])  # its cleanup aborts the engine request

    async def _produce(self, gen: AsyncIterator[pb.GenerateResponse], box: _Outbox,
                       release: Callable[[], None], shown_id: str) -> None:
        """Move ``gen``'s messages into ``box`` until it ends, fails, or overflows the cap."""
        error: BaseException | None = None
        try:
            async with contextlib.aclosing(gen):
                async for msg in gen:
                    if box.put(msg):
                        continue
                    self.metrics.rejected.labels("stream_buffer").inc()
                    log.warning("request %s: client is not reading; %d bytes unsent (cap %d); "
                                "ending the stream", shown_id, box.bytes, box.cap,
                                extra={"request_id": shown_id})
                    box.fail(ResourceLimitError(
                        f"client is not reading: over {box.cap} bytes of this stream were "
                        "waiting to be sent (steerd serve --max-stream-buffer-bytes); the "
                        "request was aborted"), drop=True)
                    break  # leaving the block closes gen: the engine request is aborted
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer, raised there
            error = e
        if box.dropped:
            release()  # the slot is free although the consumer may stay stuck in a write
        else:
            box.fail(error)

    async def _generate(self, inputs: convert.GenerateInputs, ids: list[int],
                        engine_id: str) -> AsyncIterator[pb.GenerateResponse]:
        shown_id = inputs.request_id or engine_id
        guards = inputs.guards
        # Guardrails ride as hidden reads after the request's own (``sae_runtime.spec.guardrails``).
        all_reads = inputs.reads.reads + guards.reads()
        reads = ReadSpec(all_reads) if all_reads else None
        params = eng.make_sampling_params(
            max_tokens=inputs.max_tokens, temperature=inputs.temperature, top_p=inputs.top_p,
            top_k=inputs.top_k, seed=inputs.seed, stop=list(inputs.stop),
            stop_token_ids=list(inputs.stop_token_ids), ignore_eos=inputs.ignore_eos,
            spec=inputs.spec, sae_index=self.sae_index, reads=reads, request_id=engine_id,
            logprobs=inputs.logprobs, prompt_logprobs=inputs.prompt_logprobs,
        )
        log.info("generate request_id=%s prompt_tokens=%d max_tokens=%d interventions=%d reads=%d",
                 shown_id, len(ids), inputs.max_tokens, len(inputs.spec.interventions),
                 len(inputs.reads.reads), extra={"request_id": shown_id})
        if guards.guards and self.router is None:
            raise InvalidRequestError("abort_when", "this server has no read channel")
        buf = self.router.register(engine_id) if reads and self.router else None
        feed = (_ReadFeed(buf, reads.reads, ids, shown=len(inputs.reads.reads))
                if buf is not None else None)
        trip: pb.GuardrailTrip | None = None
        sent_text = ""
        n_kept = 0  # generated tokens sent so far (a trip keeps only those up to its position)
        self.metrics.interventions.inc(len(inputs.spec.interventions))
        t0 = time.perf_counter()
        t_first = None
        outs = self._run(ids, params, inputs.spec, engine_id, shown_id)
        try:
            first = True
            position = len(ids)
            async for out in outs:
                c = out.outputs[0]
                token_ids, text, lps = list(c.token_ids), c.text, c.logprobs
                finished = out.finished
                if feed is not None:
                    feed.generated.extend(token_ids)
                if guards.guards:
                    # Every position before the newest token has been fed: check them first.
                    fed = feed.fed()
                    await feed.wait_complete(shown_id, fed)
                    hit = feed.first_trip(guards, fed)
                    if hit is not None:
                        j, p, v = hit
                        g = guards.guards[j].condition
                        trip = pb.GuardrailTrip(guardrail=j, sae=g.sae, feature=g.feature,
                                                position=p, value=v)
                        keep = max(0, min(len(token_ids), p + 1 - position))
                        token_ids, lps = token_ids[:keep], (lps[:keep] if lps else lps)
                        text = self._text_upto(feed.generated[: n_kept + keep], sent_text)
                        finished = True
                    n_kept += len(token_ids)
                    sent_text += text
                if t_first is None and token_ids:
                    t_first = time.perf_counter()
                    self.metrics.ttft.observe(t_first - t0)
                msg = pb.GenerateResponse(
                    request_id=shown_id, token_ids=token_ids, text=text,
                    first_position=position,
                )
                position += len(token_ids)
                if first:
                    msg.prompt_token_ids.extend(ids)
                    first = False
                if inputs.logprobs is not None and lps:
                    msg.logprobs.extend(convert.logprobs_to_pb(lps, inputs.logprobs))
                if inputs.prompt_logprobs is not None and out.prompt_logprobs:
                    # vLLM's first entry (position 0) is None: it has no preceding context
                    msg.prompt_logprobs.extend(convert.logprobs_to_pb(
                        [d for d in out.prompt_logprobs if d is not None], inputs.prompt_logprobs))
                if feed is not None:
                    if trip is not None:  # reads up to the trip's position, none after it
                        msg.features.extend(feed.take(final=True, fed=trip.position + 1))
                    else:
                        if finished:
                            await feed.wait_complete(shown_id)
                        msg.features.extend(feed.take(final=finished))
                if trip is not None:
                    msg.finish_reason = pb.FINISH_REASON_FEATURE
                    msg.guardrail.CopyFrom(trip)
                    log.info("request %s stopped by guardrail %d: %s[%d] = %.4g at position %d",
                             shown_id, trip.guardrail, trip.sae, trip.feature, trip.value,
                             trip.position, extra={"request_id": shown_id})
                elif finished:
                    msg.finish_reason = convert.finish_reason_to_pb(c.finish_reason)
                if finished:
                    msg.usage.CopyFrom(pb.Usage(
                        prompt_tokens=len(ids), completion_tokens=position - len(ids),
                        cached_prompt_tokens=out.num_cached_tokens or 0,
                    ))
                    n_gen = position - len(ids)
                    self.metrics.tokens.inc(n_gen)
                    if t_first is not None and n_gen > 1:
                        self.metrics.tpot.observe((time.perf_counter() - t_first) / (n_gen - 1))
                self.metrics.read_positions.inc(len({f.position for f in msg.features}))
                yield msg
                if trip is not None:
                    break  # leaving the loop aborts the engine request (``finally``)
        finally:
            await outs.aclose()  # aborts the engine request if it has not finished
            if buf is not None:
                self.router.unregister(engine_id)

    # ------------------------------------------------------------------ Encode

    @_accounted("Encode")
    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        try:
            self._check_room()
            if not request.inputs:
                raise InvalidRequestError("inputs", "give at least one input")
            if len(request.inputs) > self.limits.max_encode_inputs:
                raise InvalidRequestError(
                    "inputs", f"{len(request.inputs)} inputs given; the server allows at most "
                    f"{self.limits.max_encode_inputs} per call")
            if not request.reads:
                raise InvalidRequestError("reads", "give at least one read")
            reads = convert.reads_from_pb(request.reads, saes=self.saes, limits=self.limits,
                                          pooled=True, force_scope=ReadScope.PROMPT)
            self._check_engine()
            all_ids = []
            for j, p in enumerate(request.inputs):
                prompt = convert.prompt_from_pb(p, f"inputs[{j}]", self.limits.vocab_size)
                toks = self._tokens(prompt, f"inputs[{j}]")
                convert.check_lengths(len(toks), 1, self.max_model_len, self.limits, f"inputs[{j}]")
                all_ids.append(toks)
            release = self._admit(SteeringSpec())
        except SteeringError as e:
            await abort_with(context, e)
            return pb.EncodeResponse()
        try:
            results = await asyncio.gather(*(self._encode_one(ids, reads) for ids in all_ids))
        except SteeringError as e:
            await abort_with(context, e)
            return pb.EncodeResponse()
        finally:
            release()
        return pb.EncodeResponse(results=results)

    async def _encode_one(self, ids: list[int], reads: ReadSpec) -> pb.EncodeResult:
        engine_id = uuid.uuid4().hex
        params = eng.make_sampling_params(
            max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=[],
            stop_token_ids=[], ignore_eos=True, spec=SteeringSpec(), sae_index=self.sae_index,
            reads=reads, request_id=engine_id,
        )
        buf = self.router.register(engine_id)
        try:
            async for _ in self._run(ids, params, SteeringSpec(), engine_id):
                pass
            feed = _ReadFeed(buf, reads.reads, ids)
            await feed.wait_complete(engine_id, fed=len(ids))
            result = pb.EncodeResult(token_ids=ids, features=feed.take(final=True, fed=len(ids)))
            for j, r in enumerate(reads.reads):
                result.pooled.append(_pooled(buf, r, j, len(ids)))
            return result
        finally:
            self.router.unregister(engine_id)

    # ------------------------------------------------------------------ info

    @_accounted("ListSAEs")
    async def ListSAEs(self, request, context) -> pb.ListSAEsResponse:
        return pb.ListSAEsResponse(
            saes=[convert.sae_info_to_pb(sid, cfg, self.sae_dtypes.get(sid, ""))
                  for sid, cfg in self.saes.items() if not is_bank(sid)]
        )

    @_accounted("GetFeature")
    async def GetFeature(self, request: pb.GetFeatureRequest, context) -> pb.Feature:
        try:
            # Logit effects read the model's unembedding and the SAE's decoder on first use
            # (sae_runtime.labels.logit_effects): blocking, so off the event loop.
            from sae_runtime.labels import logit_effects

            effects = logit_effects.for_engine(self.model, self.engine, self.saes, self.tokenizer)
            return convert.feature_to_pb(await asyncio.to_thread(
                convert.get_feature, request, self.saes, self.labels, effects.get))
        except SteeringError as e:
            await abort_with(context, e)
            return pb.Feature()

    @_accounted("SearchFeatures")
    async def SearchFeatures(self, request: pb.SearchFeaturesRequest, context) -> pb.SearchFeaturesResponse:
        try:
            found = convert.search_features(request, self.saes, self.labels)
        except SteeringError as e:
            await abort_with(context, e)
            return pb.SearchFeaturesResponse()
        return pb.SearchFeaturesResponse(features=[convert.feature_to_pb(f) for f in found])

    @_accounted("GetModelInfo")
    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        mc = self.engine.model_config
        hf = mc.hf_config
        par = self.engine.vllm_config.parallel_config
        rt = eng.runtime_info(self.engine)
        return pb.GetModelInfoResponse(
            model=self.model,
            architecture=(getattr(hf, "architectures", None) or [""])[0],
            num_layers=mc.get_total_num_hidden_layers(),  # all stages, not this process's share
            hidden_size=mc.get_hidden_size(),
            vocab_size=self.limits.vocab_size,
            max_model_len=self.max_model_len,
            max_interventions=self.limits.max_interventions,
            dtype=str(mc.dtype).removeprefix("torch."),
            compiled=self.compiled,
            max_read_top_k=self.limits.max_read_top_k,
            max_watch=self.limits.max_watch,
            max_encode_inputs=self.limits.max_encode_inputs,
            max_logprobs=self.limits.max_logprobs,
            max_guardrails=self.limits.max_guardrails,
            vectors=[pb.VectorInfo(name=n, layers=sorted(ls)) for n, ls in self.vectors.rows.items()],
            inline_vector_layers=sorted(self.vectors.inline),
            max_inline_vectors=convert.MAX_INLINE_VECTORS if self.vectors.inline else 0,
            chat_template=self.has_chat_template,
            tensor_parallel_size=par.tensor_parallel_size,
            pipeline_parallel_size=par.pipeline_parallel_size,
            data_parallel_size=par.data_parallel_size,
            distributed_executor_backend=str(par.distributed_executor_backend or ""),
            device=rt.device, model_runner=rt.model_runner, cudagraph_mode=rt.cudagraph_mode,
        )


@dataclass
class Admitted:
    """A validated, admitted Generate request (its stream slot is held until released)."""

    inputs: convert.GenerateInputs
    ids: list[int]  # prompt token ids (tokenized text or rendered chat)
    release: Callable[[], None]


class _Outbox:
    """One stream's responses made by the engine side and not yet taken by the transport.

    ``bytes`` counts the queued messages plus the one the consumer is writing (``get``
    hands it out, ``sent`` takes it off once the write returned), so a write stuck on flow
    control still counts. ``put`` returns False once ``bytes`` is over ``cap``. A consumer
    that fell behind gets what queued up as one message (``_merge``), as vLLM merges the
    outputs of a slow reader, so a busy server writes fewer, larger messages.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.queue: deque[tuple[pb.GenerateResponse, int]] = deque()
        self.bytes = 0
        self.done = False
        self.dropped = False  # ended by the cap: queued messages were discarded
        self.error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, msg: pb.GenerateResponse) -> bool:
        size = msg.ByteSize()
        self.queue.append((msg, size))
        self.bytes += size
        self._ready.set()
        return self.bytes <= self.cap

    def fail(self, error: BaseException | None, drop: bool = False) -> None:
        """No more messages: the stream ends after the queued ones (all dropped with
        ``drop``), with ``error`` raised to the consumer if given."""
        if drop:
            self.bytes -= sum(size for _, size in self.queue)
            self.queue.clear()
            self.dropped = True
        self.done, self.error = True, error
        self._ready.set()

    async def get(self) -> tuple[pb.GenerateResponse, int] | None:
        """The next message and its size; None at the end; raises the stream's error."""
        while not self.queue:
            if self.done:
                if self.error is not None:
                    raise self.error
                return None
            self._ready.clear()
            await self._ready.wait()
        if len(self.queue) == 1:
            return self.queue.popleft()
        msgs = [m for m, _ in self.queue]
        size = sum(n for _, n in self.queue)
        self.queue.clear()
        return _merge(msgs), size

    def sent(self, size: int) -> None:
        self.bytes -= size


def _merge(msgs: list[pb.GenerateResponse]) -> pb.GenerateResponse:
    """Consecutive responses of one stream as one: repeated fields (tokens, reads, logprobs,
    prompt fields of the first) concatenate, ``text`` too, ``first_position`` is the first
    one's, and the last one's finish_reason and usage win."""
    out = pb.GenerateResponse()
    out.CopyFrom(msgs[0])
    for m in msgs[1:]:
        out.MergeFrom(m)
    out.text = "".join(m.text for m in msgs)
    out.first_position = msgs[0].first_position
    return out


class _ReadFeed:
    """Turns one request's buffered reads into FeatureActivations, each position once.

    Position p's activation exists once token p has been fed to the model: prompt positions
    right away, generated position p one step after token p was sampled. The newest token
    has not been fed yet, so at any time positions < prompt_len + generated - 1 are fed.
    Reads are keyed by their index in the request's read list; those from ``shown`` on are
    hidden (guardrails' reads): waited for, checked, never sent.
    """

    def __init__(self, buf: RequestReads, reads: tuple[Read, ...], prompt: list[int],
                 shown: int | None = None) -> None:
        self.buf = buf
        self.reads = list(enumerate(reads))  # (read index, read)
        self.shown = len(reads) if shown is None else shown
        self.prompt = prompt
        self.generated: list[int] = []
        self.next_pos = 0  # positions below this have been sent
        self.next_guard = 0  # positions below this have been checked against the guardrails

    def fed(self) -> int:
        return len(self.prompt) + max(len(self.generated) - 1, 0)

    def _token(self, p: int) -> int:
        """The token position ``p`` consumes (known for every fed position)."""
        n = len(self.prompt)
        return self.prompt[p] if p < n else self.generated[p - n]

    def _wanted(self, p: int) -> list[tuple[int, Read]]:
        """The reads (with their indices) whose selectors pick position ``p``."""
        n, tok = len(self.prompt), self._token(p)
        return [(j, r) for j, r in self.reads if r.covers(p, n, tok)]

    def _expected(self, upto: int) -> dict[int, set[int]]:
        out = {}
        for p in range(self.next_pos, upto):
            want = {j for j, _ in self._wanted(p)}
            if want:
                out[p] = want
        return out

    async def wait_complete(self, rid: str, fed: int | None = None) -> None:
        upto = fed if fed is not None else self.fed()
        if not await self.buf.wait_for(self._expected(upto), READ_WAIT_S):
            log.error("request %s: feature reads incomplete after %.0fs", rid, READ_WAIT_S)

    def first_trip(self, guards: GuardSpec, upto: int) -> tuple[int, int, float] | None:
        """``(guardrail, position, value)`` of the first trip at the unchecked positions
        below ``upto``, in position order (their reads have arrived: ``wait_complete``)."""
        n = len(self.prompt)
        hidden = [(j, r) for j, r in self.reads if j >= self.shown]
        while self.next_guard < upto:
            p = self.next_guard
            have = self.buf.by_pos.get(p, {})

            def value_of(sae: str, feature: int, p=p, have=have) -> float:
                for j, r in hidden:
                    if r.sae == sae and j in have and r.covers(p, n):
                        return float(have[j].watch[r.watch.index(feature)])
                return float("nan")  # not read here (a lost read): NaN never trips

            hit = guards.first_trip(p, n, value_of)
            if hit is not None:
                return hit[0], p, hit[1]
            self.next_guard += 1
        return None

    def take(self, final: bool = False, fed: int | None = None) -> list[pb.FeatureActivations]:
        """Reads of consecutive positions that are complete, from the first unsent one."""
        upto = fed if fed is not None else self.fed()
        out = []
        while self.next_pos < upto:
            p = self.next_pos
            have = self.buf.by_pos.get(p, {})
            wanted = self._wanted(p)
            if any(j not in have for j, _ in wanted) and not final:
                break  # keep order: wait for this position
            tok = self._token(p)
            out.extend(convert.feature_activations_pb(p, tok, r.sae, have[j])
                       for j, r in wanted if j in have and j < self.shown)
            self.next_pos += 1
        # sent (and checked): a long stream keeps only what is unsent
        self.buf.forget_below(min(self.next_pos, self.next_guard) if self.shown < len(self.reads)
                              else self.next_pos)
        return out


def _pooled(buf: RequestReads, read, read_i: int, n_pos: int) -> pb.PooledActivations:
    """Watch list first, then the top_k features by max activation."""
    out = pb.PooledActivations(sae=read.sae)
    p = buf.pooled.get(read_i)
    if p is None:
        return out
    mean = p.total / max(n_pos, 1)
    order = list(read.watch)
    if read.top_k:
        order += np.argsort(-p.maximum, kind="stable")[: read.top_k].tolist()
    for f in order:
        out.features.append(pb.PooledFeature(index=int(f), max=float(p.maximum[f]), mean=float(mean[f])))
    return out
