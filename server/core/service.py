"""The application core: one definition of every operation both front doors serve.

``Core`` owns admission and limits (stream slots, distinct configs), tokenization and chat
rendering, the check of a request against the server (``server.core.validate``), the
generate loop over vLLM's outputs with guardrails, read assembly
(``server.core.feed.ReadFeed``), the stream outbox (``server.core.outbox.Outbox``), metrics,
and the engine-dead check. It speaks the core's types (``server.core.types``) and raises
domain errors (``sae_runtime.errors``, mapped to a ``Code`` by ``server.core.errors``); the
doors (``server.grpc``, ``server.http``) only convert. It holds no model math and no wire
format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae_runtime.errors import (
    EngineUnavailableError,
    InternalServerError,
    InvalidRequestError,
    NotLabelledError,
    ResourceLimitError,
    SAEFormatError,
    SteeringError,
    UnknownSAEError,
    UnknownVectorError,
)
from sae_runtime.labels import store as feats
from sae_runtime.loading.vectors import (
    UPLOAD_FORMATS,
    check_vector_metadata,
    load_vector_bytes,
    write_vector_gguf,
)
from sae_runtime.saes.base import SAEConfig, Site
from sae_runtime.spec import budget
from sae_runtime.spec.activations import NO_SITES, ActivationRead, ActPool, DeclaredSites, hook_name
from sae_runtime.spec.activations import to_payload as act_payload
from sae_runtime.spec.interventions import SteeringSpec
from sae_runtime.spec.reads import ReadSpec
from sae_runtime.spec.vectors import VectorIndex
from sae_runtime.training import vectors_fit
from sae_runtime.vllm import engine as eng
from server.core import prompts, validate
from server.core.feed import READ_WAIT_S, ReadFeed, pooled
from server.core.metrics import Metrics
from server.core.outbox import Outbox
from server.core.reads import ReadRouter
from server.core.types import (
    ANONYMOUS,
    Caller,
    Chunk,
    EncodeRequest,
    EncodeResult,
    FinishReason,
    GenerateRequest,
    GuardrailTrip,
    LoadVectorRequest,
    Logprob,
    ModelInfo,
    PositionLogprobs,
    SAEInfo,
    TrainedLayer,
    TrainPosition,
    TrainVectorRequest,
    TrainVectorResult,
    Usage,
    VectorInfo,
)
from server.core.validate import Generation, Limits
from server.core.vectors import (
    MAX_METADATA,
    MAX_METADATA_LEN,
    MAX_NAME_LEN,
    Loaded,
    RuntimeVectors,
    tag_of,
)

log = logging.getLogger("steerd")

STALL_S = 0.05
"""A door that has not taken a stream's chunk after this long (its write held by flow
control) is decoupled from the engine side (``Core.stream``)."""

GUARDRAIL_MISSING_READ = ("pass", "trip")
"""What a guardrail does at a position whose guard read never arrived: ``pass`` (the
position is not checked; logged) or ``trip`` (fail closed: the stream ends as if it had
tripped, value NaN)."""


@dataclass
class Admitted:
    """A checked, admitted generation (its stream slot is held until ``release``)."""

    gen: Generation
    ids: list[int]  # prompt token ids (tokenized text or rendered chat)
    release: Callable[[], None]
    caller: Caller = ANONYMOUS


class Core:
    """Every operation of the server, over one engine."""

    def __init__(
        self,
        engine: Any,
        *,
        model: str,
        saes: Mapping[str, SAEConfig],
        limits: Limits,
        compiled: bool,
        router: ReadRouter | None = None,
        vectors: VectorIndex | None = None,
        labels: Mapping[str, feats.FeatureLabels] | None = None,
        sae_dtypes: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
        chat_template: str | None = None,
        max_concurrent_streams: int = 256,
        max_distinct_configs: int = 64,
        max_stream_buffer_bytes: int = 8 * 1024 * 1024,
        read_wait_s: float = READ_WAIT_S,
        guardrail_missing_read: str = "pass",
        on_engine_dead: Callable[[], None] | None = None,
        sites: DeclaredSites = NO_SITES,
        runtime_vectors: int = 0,
        workers: int = 1,
        vector_values: Mapping[str, Mapping[int, np.ndarray]] | None = None,
    ) -> None:
        """``runtime_vectors``: the rows each ``--runtime-vectors`` bank keeps
        (``--max-runtime-vectors``); ``workers``: how many workers (every rank of every
        engine) must confirm a vector load; ``vector_values``: the startup vectors'
        values by name and block (``ExportVector``)."""
        if guardrail_missing_read not in GUARDRAIL_MISSING_READ:
            raise ValueError(f"guardrail_missing_read: one of {GUARDRAIL_MISSING_READ}")
        self.engine = engine
        self.model = model
        self.saes = dict(saes)  # SAE id -> config; vector banks are not SAEs (``vectors``)
        self.runtime = RuntimeVectors(vectors or VectorIndex({}), runtime_vectors)
        self.workers = workers
        self.vector_values = {n: dict(v) for n, v in (vector_values or {}).items()}
        # hook ids as the workers number them: the SAEs, then the vector banks
        self.hook_index = {sid: i for i, sid in enumerate([*self.saes, *self.vectors.banks])}
        self.labels = dict(labels or {})
        self.limits = limits
        self.compiled = compiled
        self.router = router
        self.sites = sites  # raw activation read sites (--activation-hooks)
        self.sae_dtypes = dict(sae_dtypes or {})  # SAE id -> compute dtype the workers chose
        self.on_engine_dead = on_engine_dead or (lambda: None)
        self.max_model_len = engine.model_config.max_model_len
        self.tokenizer = engine.get_tokenizer()
        self.chat_template = chat_template  # --chat-template override; None: the tokenizer's
        self.metrics = metrics or Metrics()
        self.max_concurrent_streams = max_concurrent_streams
        self.max_distinct_configs = max_distinct_configs
        self.max_stream_buffer_bytes = max_stream_buffer_bytes
        self.read_wait_s = read_wait_s
        self.trip_missing = guardrail_missing_read == "trip"
        self.active_streams = 0
        self.configs: Counter[str] = Counter()  # cache salt -> in-flight requests using it
        self._stalls = StallWatch(STALL_S)
        m = self.metrics
        m.active_streams.set_function(lambda: self.active_streams)
        m.distinct_configs.set_function(lambda: len(self.configs))
        m.read_buffers.set_function(lambda: self.router.in_flight if self.router else 0)
        m.engine_requests.set_function(engine.get_num_unfinished_requests)

    @property
    def vectors(self) -> VectorIndex:
        """The vectors requests may name now: the startup ones and the runtime-loaded ones."""
        return self.runtime.index

    # ------------------------------------------------------------------ engine and admission

    @property
    def engine_dead(self) -> bool:
        """Whether the engine has stopped (health, the refusal below, the server's exit)."""
        return bool(getattr(self.engine, "errored", False))

    def check_engine(self) -> None:
        if self.engine_dead:
            raise EngineUnavailableError("the engine stopped; retry later")

    def check_room(self) -> None:
        """Refuse a call when every stream slot is taken (before any parsing or tokenizing,
        so a flood of excess calls costs the server next to nothing)."""
        if self.active_streams >= self.max_concurrent_streams:
            self.metrics.rejected.labels("concurrent_streams").inc()
            raise ResourceLimitError(
                f"the server is at its limit of {self.max_concurrent_streams} concurrent "
                "streams; retry later")

    def admit(self, spec: SteeringSpec) -> Callable[[], None]:
        """Take a stream slot (and a distinct-config slot) or raise ResourceLimitError.

        Returns the function that gives them back; calling it again does nothing.
        """
        self.check_room()
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

    async def _tokens(self, prompt, field: str) -> list[int]:
        return await prompts.tokens(self.tokenizer, prompt, self.chat_template, self.model, field)

    # ------------------------------------------------------------------ Generate

    async def admit_generate(self, req: GenerateRequest, caller: Caller = ANONYMOUS) -> Admitted:
        """Check, take a stream slot, tokenize (or render the chat), check lengths.

        Raises a domain error (the request is refused, its slot given back) or returns an
        ``Admitted`` whose slot ``stream`` gives back. The slot is taken before tokenizing,
        so concurrent huge prompts are bounded by the stream cap.
        """
        self.check_engine()
        self.check_room()
        gen = validate.generation(req, saes=self.saes, limits=self.limits, vectors=self.vectors,
                                  sites=self.sites)
        # In the same tick as the check: a vector unloaded from now on keeps its rows
        # until this request ends (``server.core.vectors``).
        unref = self.runtime.acquire(v.name for v in req.vectors)
        try:
            slot = self.admit(gen.spec)
        except BaseException:
            unref()
            raise

        def release() -> None:
            slot()
            unref()

        try:
            ids = await self._tokens(gen.prompt, "prompt")
            if gen.max_tokens is None:  # fit_max_tokens: what the context allows
                room = max(self.max_model_len - len(ids), 1)
                gen = gen.with_max_tokens(min(room, self.limits.max_new_tokens or room))
            validate.check_lengths(len(ids), gen.max_tokens, self.max_model_len, self.limits)
            validate.activation_budget(gen.acts, len(ids), len(ids) + gen.max_tokens, self.sites,
                                       self.limits)
        except BaseException:
            release()
            raise
        return Admitted(gen, ids, release, caller)

    async def generate(self, req: GenerateRequest, caller: Caller = ANONYMOUS) -> AsyncIterator[Chunk]:
        """``admit_generate`` then ``stream``: refusals raise here, before any chunk."""
        return self.stream(await self.admit_generate(req, caller))

    async def stream(self, admitted: Admitted) -> AsyncIterator[Chunk]:
        """Run an admitted request; releases its slot when the stream ends (or is closed).

        While the door keeps up, the stream pulls each chunk straight from the engine side
        and hands it over in the same task (no hop). A door that does not come back for the
        next chunk within ``STALL_S`` (its write is held by flow control: the client is not
        reading) is decoupled: from then on the engine side runs in its own task and hands
        chunks over through an ``Outbox``, so a stalled client stalls only this generator,
        not the engine request. What piles up in between is capped at
        ``max_stream_buffer_bytes``: past it the engine request is aborted, its reads and
        unsent chunks dropped, its slot given back, and the stream ends with
        RESOURCE_EXHAUSTED as soon as the client takes what its window already holds.
        """
        engine_id = uuid.uuid4().hex
        part = max(self.max_stream_buffer_bytes // 4, 1)
        gen = self._generate(admitted, engine_id, part)
        shown_id = admitted.gen.request_id or engine_id
        loop = asyncio.get_running_loop()
        box: Outbox | None = None
        producer: asyncio.Task | None = None
        handing = self._stalls.watch()

        def decouple() -> None:
            nonlocal box, producer
            box = Outbox(self.max_stream_buffer_bytes, part)
            producer = asyncio.create_task(self._produce(gen, box, admitted.release, shown_id))

        handing.decouple = decouple
        try:
            while box is None:
                try:
                    chunk, _ = await anext(gen)
                except StopAsyncIteration:
                    return
                handing.since = loop.time()
                yield chunk  # returns once the door has taken it (the transport, for gRPC)
                handing.since = None
            self._stalls.forget(handing)
            while (item := await box.get()) is not None:
                chunk, size, exempt = item
                yield chunk
                box.sent(size, exempt)
        finally:
            self._stalls.forget(handing)
            admitted.release()
            if producer is not None:
                producer.cancel()
                await asyncio.wait([producer])  # its cleanup aborts the engine request
            else:
                await gen.aclose()  # aborts the engine request if it has not finished

    async def collect(self, stream: AsyncIterator[Chunk]) -> list[Chunk]:
        """A whole (non-streamed) generation, capped like a stream: past
        ``max_stream_buffer_bytes`` in all it ends with RESOURCE_EXHAUSTED."""
        out, size = [], 0
        try:
            async for chunk in stream:
                size += chunk.nbytes()
                if size > self.max_stream_buffer_bytes:
                    self.metrics.rejected.labels("reply_bytes").inc()
                    raise validate.reply_cap(self.max_stream_buffer_bytes, "response")
                out.append(chunk)
        finally:
            await stream.aclose()
        return out

    async def _produce(self, gen: AsyncIterator[tuple[Chunk, int]], box: Outbox,
                       release: Callable[[], None], shown_id: str) -> None:
        """Move ``gen``'s chunks into ``box`` until it ends, fails, or overflows the cap."""
        error: BaseException | None = None
        try:
            async with contextlib.aclosing(gen):
                async for chunk, exempt in gen:
                    if box.put(chunk, exempt):
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

    async def _run(self, ids: list[int], params: Any, spec: SteeringSpec, engine_id: str,
                   shown_id: str = "", caller: Caller = ANONYMOUS) -> AsyncIterator[Any]:
        """Engine outputs of one request; aborts the engine request if left early.

        Engine death raises EngineUnavailableError, anything else InternalServerError (logged
        here, with only the request id in the message). ``shown_id`` is the id the caller
        knows (their request_id), used in messages and logs.
        """
        shown_id = shown_id or engine_id
        finished = False
        try:
            prompt = eng.make_prompt(ids, spec, caller.tenant)
            async with contextlib.aclosing(self.engine.generate(prompt, params, engine_id)) as outs:
                async for out in outs:
                    finished = out.finished
                    yield out
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped, never leaked
            if type(e).__name__ == "EngineDeadError" or self.engine_dead:
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

    def _text_upto(self, generated: list[int], sent: str) -> str:
        """The text of ``generated`` past what was already sent as ``sent`` (a guardrail
        cut the engine's delta short, so its text is decoded here, as vLLM decodes it)."""
        full = self.tokenizer.decode(generated, skip_special_tokens=True)
        return full[len(sent):] if full.startswith(sent) else ""

    async def _generate(self, admitted: Admitted, engine_id: str,
                        part: int) -> AsyncIterator[tuple[Chunk, int]]:
        """The stream's chunks, each with the bytes of its prompt-position reads (exempt from
        the outbox cap); a chunk whose reads are over ``part`` bytes goes out in parts."""
        gen, ids = admitted.gen, admitted.ids
        shown_id = gen.request_id or engine_id
        guards = gen.guards
        # Guardrails ride as hidden reads after the request's own (``sae_runtime.spec.guardrails``).
        all_reads = gen.reads.reads + guards.reads()
        reads = ReadSpec(all_reads) if all_reads else None
        params = eng.make_sampling_params(
            max_tokens=gen.max_tokens, temperature=gen.temperature, top_p=gen.top_p,
            top_k=gen.top_k, seed=gen.seed, stop=list(gen.stop),
            stop_token_ids=list(gen.stop_token_ids), ignore_eos=gen.ignore_eos,
            spec=gen.spec, sae_index=self.hook_index, reads=reads, request_id=engine_id,
            logprobs=gen.logprobs, prompt_logprobs=gen.prompt_logprobs,
            acts=act_payload(gen.acts, self.sites),
        )
        log.info("generate request_id=%s prompt_tokens=%d max_tokens=%d interventions=%d reads=%d",
                 shown_id, len(ids), gen.max_tokens, len(gen.spec.interventions),
                 len(gen.reads.reads), extra={"request_id": shown_id})
        if guards.guards and self.router is None:
            raise InvalidRequestError("abort_when", "this server has no read channel")
        if gen.acts and self.router is None:
            raise InvalidRequestError("activation_reads", "this server has no read channel")
        buf = self.router.register(engine_id) if (reads or gen.acts) and self.router else None
        feed = (ReadFeed(buf, reads.reads if reads else (), ids, shown=len(gen.reads.reads),
                         wait_s=self.read_wait_s, trip_missing=self.trip_missing, acts=gen.acts)
                if buf is not None else None)
        trip: GuardrailTrip | None = None
        sent_text = ""
        n_kept = 0  # generated tokens sent so far (a trip keeps only those up to its position)
        n_prompt = len(ids)
        self.metrics.interventions.inc(len(gen.spec.interventions))
        t0 = time.perf_counter()
        t_first = None
        outs = self._run(ids, params, gen.spec, engine_id, shown_id, admitted.caller)
        try:
            first = True
            position = n_prompt
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
                        trip = GuardrailTrip(j, g.sae, g.feature, p, v)
                        keep = max(0, min(len(token_ids), p + 1 - position))
                        token_ids, lps = token_ids[:keep], (lps[:keep] if lps else lps)
                        text = self._text_upto(feed.generated[: n_kept + keep], sent_text)
                        finished = True
                    n_kept += len(token_ids)
                    sent_text += text
                if t_first is None and token_ids:
                    t_first = time.perf_counter()
                    self.metrics.ttft.observe(t_first - t0)
                msg = Chunk(shown_id, token_ids, text, position)
                position += len(token_ids)
                if first:
                    msg.prompt_token_ids = ids
                    first = False
                if gen.logprobs is not None and lps:
                    msg.logprobs = logprobs_of(lps, gen.logprobs)
                if gen.prompt_logprobs is not None and out.prompt_logprobs:
                    # vLLM's first entry (position 0) is None: it has no preceding context
                    msg.prompt_logprobs = logprobs_of(
                        [d for d in out.prompt_logprobs if d is not None], gen.prompt_logprobs)
                if feed is not None:
                    if trip is not None:  # reads up to the trip's position, none after it
                        msg.features = feed.take(final=True, fed=trip.position + 1)
                    else:
                        if finished:
                            await feed.wait_complete(shown_id)
                        msg.features = feed.take(final=finished)
                    if gen.acts:
                        msg.activations = feed.activations(final=finished or trip is not None)
                if trip is not None:
                    msg.finish_reason = FinishReason.FEATURE
                    msg.guardrail = trip
                    log.info("request %s stopped by guardrail %d: %s[%d] = %.4g at position %d",
                             shown_id, trip.guardrail, trip.sae, trip.feature, trip.value,
                             trip.position, extra={"request_id": shown_id})
                elif finished:
                    msg.finish_reason = finish_reason_of(c.finish_reason)
                if finished:
                    msg.usage = Usage(n_prompt, position - n_prompt, out.num_cached_tokens or 0)
                    n_gen = position - n_prompt
                    self.metrics.tokens.inc(n_gen)
                    if t_first is not None and n_gen > 1:
                        self.metrics.tpot.observe((time.perf_counter() - t_first) / (n_gen - 1))
                # prompt-position rows are exempt from the outbox cap (``Outbox``)
                exempt_acts = sum(a.values[0].nbytes if len(a.values) else 0
                                  for a in msg.activations for p in a.positions if p < n_prompt
                                  if a.values.shape[0] == len(a.positions))
                if msg.features:
                    self.metrics.read_positions.inc(len({f.position for f in msg.features}))
                    for i, piece in enumerate(split(msg, part)):
                        yield piece, (sum(f.nbytes() for f in piece.features if f.position < n_prompt)
                                      + (exempt_acts if i == 0 else 0))
                else:
                    yield msg, exempt_acts
                if trip is not None:
                    break  # leaving the loop aborts the engine request (``finally``)
        finally:
            await outs.aclose()  # aborts the engine request if it has not finished
            if buf is not None:
                self.router.unregister(engine_id)

    # ------------------------------------------------------------------ Encode

    async def encode(self, req: EncodeRequest, caller: Caller = ANONYMOUS) -> list[EncodeResult]:
        """Per-position reads and pooled features of each input, no generation. The answer
        is capped at ``max_stream_buffer_bytes`` (RESOURCE_EXHAUSTED past it)."""
        self.check_engine()
        self.check_room()
        reads = validate.encode_reads(req.reads, n_inputs=len(req.inputs), saes=self.saes,
                                      limits=self.limits, acts=req.activation_reads,
                                      sites=self.sites)
        prompts_ = [validate.checked_prompt(p, f"inputs[{j}]", self.limits.vocab_size)
                    for j, p in enumerate(req.inputs)]
        release = self.admit(SteeringSpec())
        try:
            all_ids = []
            for j, p in enumerate(prompts_):
                toks = await self._tokens(p, f"inputs[{j}]")
                validate.check_lengths(len(toks), 1, self.max_model_len, self.limits, f"inputs[{j}]")
                validate.activation_budget(req.activation_reads, len(toks), len(toks), self.sites,
                                           self.limits)
                all_ids.append(toks)
            results = await asyncio.gather(*(self._encode_one(ids, reads, caller,
                                                              req.activation_reads)
                                             for ids in all_ids))
        finally:
            release()
        size = sum(f.nbytes() for r in results for f in r.features)
        size += sum(5 * len(r.token_ids) + sum(16 + 14 * len(p.features) for p in r.pooled)
                    + sum(a.nbytes() for a in r.activations) for r in results)
        if size > self.max_stream_buffer_bytes:
            self.metrics.rejected.labels("reply_bytes").inc()
            raise validate.reply_cap(self.max_stream_buffer_bytes, "Encode answer")
        return results

    async def _encode_one(self, ids: list[int], reads: ReadSpec, caller: Caller,
                          acts: tuple[ActivationRead, ...] = ()) -> EncodeResult:
        engine_id = uuid.uuid4().hex
        params = eng.make_sampling_params(
            max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=[],
            stop_token_ids=[], ignore_eos=True, spec=SteeringSpec(), sae_index=self.hook_index,
            reads=reads, request_id=engine_id, acts=act_payload(acts, self.sites),
        )
        if self.router is None:
            raise InvalidRequestError("reads", "this server has no read channel")
        buf = self.router.register(engine_id)
        try:
            async for _ in self._run(ids, params, SteeringSpec(), engine_id, caller=caller):
                pass
            feed = ReadFeed(buf, reads.reads, ids, wait_s=self.read_wait_s, acts=acts)
            await feed.wait_complete(engine_id, fed=len(ids))
            return EncodeResult(ids, feed.take(final=True, fed=len(ids)),
                                [pooled(buf, r, j, len(ids)) for j, r in enumerate(reads.reads)],
                                feed.activations(final=True))
        finally:
            self.router.unregister(engine_id)

    # ------------------------------------------------------------------ features and info

    def list_saes(self) -> list[SAEInfo]:
        return [sae_info(sid, cfg, self.sae_dtypes.get(sid, ""), sid in self.labels)
                for sid, cfg in self.saes.items()]

    async def get_feature(self, sae: str, index: int) -> feats.Feature:
        """The feature's record: its labels when its SAE has a labels file (else an empty
        label), with logit effects from the file or, where it has none, computed from the
        model's weights (loaded on first use: in a worker thread, off the event loop)."""
        if sae not in self.saes:
            raise UnknownSAEError("sae", sae, list(self.saes))
        d_sae = self.saes[sae].d_sae
        if not 0 <= index < d_sae:
            raise InvalidRequestError("index", f"{index} is out of range: SAE {sae!r} has "
                                      f"{d_sae} features (0..{d_sae - 1})")
        lab = self.labels.get(sae)
        f = lab.get(index) if lab is not None else feats.Feature(sae, index, "")
        if f.promoted or f.suppressed:
            return f
        from dataclasses import replace

        from sae_runtime.labels import logit_effects

        effects = logit_effects.for_engine(self.model, self.engine, self.saes, self.tokenizer)
        e = await asyncio.to_thread(effects.get, sae, index)
        return replace(f, promoted=e.promoted, suppressed=e.suppressed,
                       logit_effects_unavailable=e.unavailable)

    def search_features(self, query: str, sae: str = "", limit: int = 0) -> list[feats.Feature]:
        limit = validate.search_args(query, limit)
        if sae:
            if sae not in self.saes:
                raise UnknownSAEError("sae", sae, list(self.saes))
            if sae not in self.labels:
                raise NotLabelledError(
                    f"sae: SAE {sae!r} has no feature labels; put a {feats.LABELS_FILE} beside "
                    f"its weights (labelled SAEs: {', '.join(self.labels) or 'none'})")
            scope = {sae: self.labels[sae]}
        elif not self.labels:
            raise NotLabelledError(
                f"no loaded SAE has feature labels (looked for {feats.LABELS_FILE} beside each SAE)")
        else:
            scope = dict(self.labels)
        return feats.search(scope, query, limit)

    def token_pieces(self, ids: list[int]) -> list[str]:
        """Each token id decoded on its own (a page labels per-position reads with them)."""
        if len(ids) > self.max_model_len:
            raise InvalidRequestError("token_ids", f"{len(ids)} ids; at most the model length "
                                      f"{self.max_model_len}")
        vocab = self.limits.vocab_size
        for j, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise InvalidRequestError(f"token_ids[{j}]", f"must be a token id in [0, {vocab})")
        return [self.tokenizer.decode([t]) for t in ids]

    def model_info(self) -> ModelInfo:
        mc = self.engine.model_config
        hf = mc.hf_config
        par = self.engine.vllm_config.parallel_config
        lim = self.limits
        rt = eng.runtime_info(self.engine)
        return ModelInfo(
            model=self.model, architecture=(getattr(hf, "architectures", None) or [""])[0],
            num_layers=mc.get_total_num_hidden_layers(),  # all stages, not this process's share
            hidden_size=mc.get_hidden_size(), vocab_size=lim.vocab_size,
            max_model_len=self.max_model_len, max_interventions=lim.max_interventions,
            dtype=str(mc.dtype).removeprefix("torch."), compiled=self.compiled,
            max_read_top_k=lim.max_read_top_k, max_watch=lim.max_watch,
            max_encode_inputs=lim.max_encode_inputs, max_logprobs=lim.max_logprobs,
            chat_template=self.has_chat_template,
            tensor_parallel_size=par.tensor_parallel_size,
            pipeline_parallel_size=par.pipeline_parallel_size,
            data_parallel_size=par.data_parallel_size,
            distributed_executor_backend=str(par.distributed_executor_backend or ""),
            max_guardrails=lim.max_guardrails,
            vectors=tuple(self.list_vectors()),
            inline_vector_layers=tuple(sorted(self.vectors.inline)),
            max_inline_vectors=validate.MAX_INLINE_VECTORS if self.vectors.inline else 0,
            runtime_vector_layers=self.runtime.layers,
            max_runtime_vectors=self.runtime.per_layer if self.runtime.layers else 0,
            device=rt.device, model_runner=rt.model_runner, cudagraph_mode=rt.cudagraph_mode,
            activation_hooks=self.sites.names,
            activation_hooks_with_edits=self.sites.twin_hooks,
            max_activation_reads=lim.max_activation_reads if self.sites.names else 0,
            max_activation_positions=lim.max_activation_positions if self.sites.names else 0,
            max_activation_bytes=lim.max_activation_bytes if self.sites.names else 0,
        )


    # ------------------------------------------------------------------ runtime vectors

    def list_vectors(self) -> list[VectorInfo]:
        """Every vector requests may name: the startup ones, then the runtime-loaded ones."""
        live = self.runtime.live
        return [VectorInfo(n, tuple(sorted(ls)), n in live,
                           tuple(sorted(live[n].metadata.items())) if n in live else ())
                for n, ls in self.vectors.rows.items()]

    async def load_vector(self, req: LoadVectorRequest) -> VectorInfo:
        """Write a vector into free runtime rows on every worker, then let requests name it.

        Returns only when every worker confirmed the write (each rank of a bank's stage
        writes it; a worker that fails or is missing fails the load, and its rows are free
        again). Errors name the request field: INVALID_ARGUMENT for a bad name, layer,
        width, value or file; RESOURCE_EXHAUSTED when a layer has no free row."""
        self.check_engine()
        self.runtime.check_name(req.name)
        values, meta, field = await self._vector_values(req)
        rows = self.runtime.reserve(req.name, values, field)
        banks = self.runtime.base.runtime
        writes = [(self.hook_index[banks[k][0]], row, values[k].astype("<f4").tobytes())
                  for k, row in rows.items()]
        try:
            answers = await eng.write_vectors(self.engine, writes)
            wrote = {h for a in answers for h in a.get("written", ())}
            missing = sorted({h for h, _, _ in writes} - wrote)
            if len(answers) != self.workers or missing:
                raise InternalServerError(
                    f"vector {req.name!r}: {len(answers)} of {self.workers} workers answered "
                    f"the load; banks nobody wrote: {missing}")
        except BaseException as e:
            self.runtime.cancel(req.name, rows)
            if isinstance(e, SteeringError) or not isinstance(e, Exception):
                raise
            if type(e).__name__ == "EngineDeadError" or self.engine_dead:
                self.on_engine_dead()
                raise EngineUnavailableError("the engine stopped; retry later") from None
            log.exception("vector %r: the workers' write failed", req.name)
            raise InternalServerError(f"vector {req.name!r}: the workers could not write it") \
                from None
        v = self.runtime.commit(req.name, rows, tag_of(values), meta, values)
        log.info("runtime vector %r loaded at blocks %s (rows %s)", req.name, sorted(rows),
                 [rows[k] for k in sorted(rows)])
        return self._info(v)

    def unload_vector(self, name: str) -> VectorInfo:
        """Make ``name`` unknown to new requests; running ones keep it to their end (its rows
        are freed then)."""
        v = self.runtime.unload(name)
        log.info("runtime vector %r unloaded (%d running request(s) still use it)", name, v.users)
        return self._info(v)

    async def export_vector(self, name: str) -> tuple[bytes, VectorInfo]:
        """A vector requests may name as a self-describing GGUF (``write_vector_gguf``)."""
        live = self.runtime.live.get(name)
        values = live.values if live is not None else self.vector_values.get(name)
        if values is None:
            known = ", ".join(sorted(self.vectors.rows)) or "none"
            raise UnknownVectorError("name", f"no steering vector named {name!r}; loaded: {known}")
        if 0 in values:
            raise InvalidRequestError("name", f"vector {name!r} has a block 0 row, which a "
                                      "llama.cpp control vector cannot hold")
        meta = live.metadata if live is not None else {}
        d = self.engine.model_config.get_hidden_size()

        def write() -> bytes:
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory(prefix="steerd-export-") as tmp:
                p = write_vector_gguf(Path(tmp) / "v.gguf", values, model_id=self.model,
                                      hidden_size=d, method=meta.get("method", ""))
                return p.read_bytes()

        data = await asyncio.to_thread(write)
        info = self._info(live) if live is not None else VectorInfo(name, tuple(sorted(values)))
        return data, info

    async def train_vector(self, req: TrainVectorRequest,
                           caller: Caller = ANONYMOUS) -> TrainVectorResult:
        """Fit a steering vector from contrastive prompts on this engine's own activations
        (``sae_runtime.training.vectors_fit``), and with ``register`` load it as a runtime
        vector (``load_vector``) so the next request can name it.

        Each prompt's activation at ``blocks.L.hook_resid_post`` (the output of block L,
        the ``--vector`` convention) of every requested layer, pooled LAST or MEAN over
        ``positions``, comes from ``Encode`` passes of ``max_encode_inputs`` prompts with
        one activation read per layer. Errors name the request's fields (``positive[3]``,
        ``layers[1]``); a layer whose site is not declared (``--activation-hooks``) or, with
        ``register``, that takes no runtime vectors (``--runtime-vectors``) is refused
        before any pass runs."""
        self.check_engine()
        try:
            method = vectors_fit.Method(req.method)
        except ValueError:
            raise InvalidRequestError("method", f"{req.method}: MEAN_DIFF or PCA") from None
        if req.position not in TrainPosition.__members__.values():
            raise InvalidRequestError("position", f"{req.position}: LAST or MEAN")
        if req.register:
            self.runtime.check_name(req.name)
        elif len(req.name) > MAX_NAME_LEN:
            raise InvalidRequestError("name", f"at most {MAX_NAME_LEN} characters")
        budget.check_train(len(req.positive), len(req.negative), req.layers,
                           paired=method is vectors_fit.Method.PCA,
                           max_reads=self.limits.max_activation_reads)
        n_layers = self.engine.model_config.get_total_num_hidden_layers()
        hooks = []
        for j, layer in enumerate(req.layers):
            if not 0 <= layer < n_layers:
                raise InvalidRequestError(f"layers[{j}]", f"block {layer}; the model has "
                                          f"blocks 0..{n_layers - 1}")
            hook = hook_name(layer, "resid_post")
            if hook not in self.sites.names:
                declared = ", ".join(self.sites.globs) or "none"
                raise InvalidRequestError(f"layers[{j}]", f"{hook} is not readable on this "
                                          f"server (steerd serve --activation-hooks; "
                                          f"declared: {declared})")
            if req.register and layer not in self.runtime.layers:
                raise InvalidRequestError(f"layers[{j}]", f"block {layer} takes no runtime "
                                          f"vectors, so the vector cannot be registered; "
                                          f"blocks that do: {list(self.runtime.layers)} "
                                          "(steerd serve --runtime-vectors)")
            hooks.append(hook)
        if req.positions is not None:
            req.positions.validate("positions", self.limits.vocab_size)
        pool = ActPool.MEAN if req.position is TrainPosition.MEAN else ActPool.LAST
        acts = tuple(ActivationRead(h, req.positions, pool) for h in hooks)
        fields = [f"positive[{i}]" for i in range(len(req.positive))] + \
            [f"negative[{i}]" for i in range(len(req.negative))]
        prompts_ = [*req.positive, *req.negative]
        rows: list[list[np.ndarray]] = []  # per prompt, per layer: [d]
        step = max(1, self.limits.max_encode_inputs)
        for lo in range(0, len(prompts_), step):
            part = tuple(prompts_[lo:lo + step])
            try:
                results = await self.encode(EncodeRequest(part, (), acts), caller)
            except InvalidRequestError as e:
                raise train_field(e, fields[lo:]) from None
            for j, r in enumerate(results):
                if any(a.values.shape[0] != 1 for a in r.activations):
                    raise InvalidRequestError(fields[lo + j], f"the positions select none of "
                                              f"its {len(r.token_ids)} tokens")
                rows.append([a.values[0] for a in r.activations])
        n_pos = len(req.positive)
        out = []
        for k, layer in enumerate(req.layers):
            h = np.stack([r[k] for r in rows]).astype(np.float64)  # [n_pos + n_neg, d]
            pos, neg = h[:n_pos], h[n_pos:]
            v, sep = await asyncio.to_thread(self._fit, pos, neg, method, req.normalize)
            out.append(TrainedLayer(layer, v, sep.mean_positive, sep.mean_negative,
                                    sep.accuracy, sep.held_out_accuracy, sep.held_out))
        log.info("trained vector %r (%s, %s) at blocks %s from %d+%d prompts; held-out "
                 "accuracy %s", req.name, method.name, req.position.name, list(req.layers),
                 n_pos, len(req.negative), [round(t.held_out_accuracy, 3) for t in out])
        info = None
        if req.register:
            meta = {"method": method.name.lower(), "position": req.position.name.lower(),
                    "trained_from": f"{n_pos} positive, {len(req.negative)} negative prompts",
                    **dict(req.metadata)}
            info = await self.load_vector(LoadVectorRequest(
                req.name, tuple((t.layer, t.values) for t in out),
                metadata=tuple(sorted(meta.items()))))
        return TrainVectorResult(req.name, tuple(out), info)

    @staticmethod
    def _fit(pos: np.ndarray, neg: np.ndarray, method: vectors_fit.Method,
             normalize: bool) -> tuple[np.ndarray, vectors_fit.Separation]:
        v = vectors_fit.fit(pos, neg, method, normalize)
        return v, vectors_fit.separation(v, pos, neg, method, normalize)

    @staticmethod
    def _info(v: Loaded) -> VectorInfo:
        return VectorInfo(v.name, tuple(sorted(v.rows)), True, tuple(sorted(v.metadata.items())))

    async def _vector_values(self, req: LoadVectorRequest
                             ) -> tuple[dict[int, np.ndarray], dict[str, str], str]:
        """The checked ``{layer: float32 [d_model]}`` of a load, its metadata, and the
        field its layers came from (``layers`` or ``file``)."""
        d, n_layers = self.engine.model_config.get_hidden_size(), \
            self.engine.model_config.get_total_num_hidden_layers()
        meta: dict[str, str] = {}
        if len(req.metadata) > MAX_METADATA:
            raise InvalidRequestError("metadata", f"{len(req.metadata)} entries; at most "
                                      f"{MAX_METADATA}")
        for k, v in req.metadata:
            if len(k) > MAX_METADATA_LEN or len(v) > MAX_METADATA_LEN:
                raise InvalidRequestError(f"metadata[{k[:40]!r}]", f"keys and values have at "
                                          f"most {MAX_METADATA_LEN} characters")
        if req.values and req.file:
            raise InvalidRequestError("file", "give the values by layer or a file, not both")
        if req.file:
            field = "file"
            if req.file_format not in UPLOAD_FORMATS:
                raise InvalidRequestError("file_format", f"{req.file_format!r}: one of "
                                          f"{', '.join(UPLOAD_FORMATS)}")
            try:
                got, meta = await asyncio.to_thread(load_vector_bytes, req.file, req.file_format)
                check_vector_metadata(meta, model_id=self.model, hidden_size=d, where="file")
            except SAEFormatError as e:
                msg = str(e).split(": ", 1)[-1] if str(e).startswith("/") else str(e)
                raise InvalidRequestError("file", msg.removeprefix("file: ")) from None
            items = [(k, v, f"file: layer {k}") for k, v in got.items()]
        elif req.values:
            field = "layers"
            items = [(k, np.asarray(v, dtype=np.float32), f"layers[{j}]")
                     for j, (k, v) in enumerate(req.values)]
        else:
            raise InvalidRequestError("layers", "give the vector's values by layer, or a file")
        values: dict[int, np.ndarray] = {}
        for k, v, where in items:
            f, what = (where.split(": ")[0], where.split(": ")[1] + ": ") if field == "file" \
                else (where, "")
            if not 0 <= k < n_layers:
                raise InvalidRequestError(f if field == "file" else f"{f}.layer",
                                          f"{what}block {k}; the model has blocks 0..{n_layers - 1}")
            if k in values:
                raise InvalidRequestError(f"{f}.layer", f"block {k} is given twice")
            if v.shape != (d,):
                raise InvalidRequestError(f if field == "file" else f"{f}.values",
                                          f"{what}{v.size} values; the model's hidden size is {d}")
            if not np.isfinite(v).all():
                raise InvalidRequestError(f if field == "file" else f"{f}.values",
                                          f"{what}values must be finite")
            values[k] = v
        return values, {**meta, **dict(req.metadata)}, field


def train_field(e: InvalidRequestError, fields: list[str]) -> InvalidRequestError:
    """An Encode pass's error with ``TrainVector``'s field: ``inputs[j]`` is the j-th prompt
    of the pass (``fields``), ``activation_reads[k].positions`` is ``positions``,
    ``activation_reads[k]`` the k-th layer."""
    f = e.field
    m = re.match(r"inputs\[(\d+)\](.*)", f)
    if m:
        f = fields[int(m.group(1))] + m.group(2)
    elif (m := re.match(r"activation_reads\[(\d+)\](.*)", f)):
        f = "positions" + m.group(2).removeprefix(".positions") if ".positions" in m.group(2) \
            else f"layers[{m.group(1)}]"
    return InvalidRequestError(f, e.description)


class Handover:
    """One stream handing its chunks to the door directly: ``since`` is when the door got
    the current one (None while the stream is pulling the next); ``decouple`` moves the
    engine side into its own task."""

    __slots__ = ("since", "decouple")

    def __init__(self) -> None:
        self.since: float | None = None
        self.decouple: Callable[[], None] = lambda: None


class StallWatch:
    """Finds streams whose door has held a chunk longer than ``stall_s`` and decouples
    them: one task for all streams, ticking while any is watched, so a stream's chunk costs
    two assignments, not a timer."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.streams: set[Handover] = set()
        self._task: asyncio.Task | None = None

    def watch(self) -> Handover:
        h = Handover()
        self.streams.add(h)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return h

    def forget(self, h: Handover) -> None:
        self.streams.discard(h)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.streams:
            await asyncio.sleep(self.stall_s / 2)
            now = loop.time()
            for h in [h for h in self.streams if h.since is not None and now - h.since > self.stall_s]:
                self.streams.discard(h)
                h.decouple()


def sae_info(sae_id: str, cfg: SAEConfig, dtype: str, labelled: bool) -> SAEInfo:
    return SAEInfo(
        id=sae_id, format=cfg.format, architecture=cfg.architecture, hook_name=cfg.hook_name,
        site=Site[cfg.site.upper()], layer=cfg.layer, d_sae=cfg.d_sae, d_in=cfg.d_in,
        dtype=dtype, model_name=cfg.model_name, k=cfg.k or 0,
        input_site=Site.MLP_IN if cfg.input_site else None,  # hook_name says which (proto)
        hook_name_out=cfg.hook_name_out, labelled=labelled, layers=tuple(cfg.clt_layers),
        features_per_layer=cfg.features_per_layer if cfg.clt_layers else 0)


def finish_reason_of(reason: str | None) -> FinishReason | None:
    """vLLM's finish reason (``length``, ``stop``, ``abort``) as a ``FinishReason``."""
    return FinishReason[reason.upper()] if reason and reason.upper() in FinishReason.__members__ \
        else None


def logprobs_of(entries, n: int) -> list[PositionLogprobs]:
    """vLLM's per-position logprob dicts as ``PositionLogprobs``.

    Each dict maps token id -> Logprob(logprob, rank, decoded_token); vLLM inserts the
    chosen token first, then the top ``n`` (the chosen one is not repeated when it is
    among them, so a dict has ``n`` or ``n + 1`` entries).
    """
    out = []
    for d in entries:
        items = list(d.items())
        (cid, c), rest = items[0], items[1:]
        top = rest if len(items) == n + 1 else sorted(items, key=lambda kv: kv[1].rank)
        out.append(PositionLogprobs(_logprob(cid, c), [_logprob(t, lp) for t, lp in top[:n]]))
    return out


def _logprob(token_id: int, lp) -> Logprob:
    # -inf (a masked token) is not representable by every client; clamp as OpenAI does
    return Logprob(token_id, max(lp.logprob, -9999.0), lp.rank or 0, lp.decoded_token or "")


def split(chunk: Chunk, part: int) -> list[Chunk]:
    """``chunk`` as consecutive chunks whose reads hold at most ``part`` bytes each (at
    position boundaries): the first keeps the tokens, the last the finish reason and usage."""
    groups: list[list] = [[]]
    size = 0
    for f in chunk.features:
        n = f.nbytes()
        if groups[-1] and size + n > part and f.position != groups[-1][-1].position:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += n
    if len(groups) == 1:
        return [chunk]
    nxt = chunk.first_position + len(chunk.token_ids)
    out = [Chunk(chunk.request_id, chunk.token_ids, chunk.text, chunk.first_position,
                 chunk.prompt_token_ids, chunk.logprobs, chunk.prompt_logprobs, groups[0],
                 activations=chunk.activations)]
    out += [Chunk(chunk.request_id, [], "", nxt, features=g) for g in groups[1:]]
    last = out[-1]
    last.finish_reason, last.guardrail, last.usage = chunk.finish_reason, chunk.guardrail, chunk.usage
    return out
