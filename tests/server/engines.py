"""Stand-ins for vLLM's AsyncLLM and the worker's read channel, for tests of the core and the
doors' conversion and flow logic (as tests/server allows); behaviour claims against the real
engine live in tests/e2e.

``FakeEngine`` emits one token per step (``step_s`` apart) until ``max_tokens``; with a
``FakeRouter`` it also delivers the reads a request asks for (``RequestPayload.reads``), as
the worker would: prompt positions with the first step, then one generated position per
step, each read's values a deterministic function of (position, feature), each activation
read's rows one of (worker site, position) (``act_rows``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from sae_runtime.spec.payloads import decode_request
from sae_runtime.step.config import AdditionalConfig, SAEEntry, WorkerConfig
from sae_runtime.step.records import ActRecord, ReadRecord
from server.core.reads import RequestReads


class FakeRouter:
    """``ReadRouter``'s interface without the socket: buffers by request id."""

    def __init__(self) -> None:
        self.buffers: dict[str, RequestReads] = {}

    def register(self, rid: str) -> RequestReads:
        buf = self.buffers[rid] = RequestReads()
        return buf

    def unregister(self, rid: str) -> None:
        self.buffers.pop(rid, None)

    @property
    def in_flight(self) -> int:
        return len(self.buffers)


def read_value(position: int, feature: int) -> float:
    """What the fake worker reads for ``feature`` at ``position``."""
    return float((position * 7 + feature * 3) % 11) - 2.0


def act_rows(site: int, positions, d: int) -> np.ndarray:
    """What the fake worker copies at worker activation site ``site`` (a declared site or a
    before-edits twin, ``DeclaredSites.site_id``) for ``positions``: ``[n, d]`` float32."""
    pos = np.asarray(list(positions), dtype=np.float32)[:, None]
    return (1000.0 * site + pos + np.arange(d, dtype=np.float32)[None, :] / d).astype(np.float32)


class FakeEngine:
    """What the core reads of an AsyncLLM, and a scripted ``generate``."""

    def __init__(self, tokenizer=None, *, max_model_len: int = 100_000, step_s: float = 0.001,
                 fail_after: int | None = None, text_len: int = 100, vocab_size: int = 100,
                 saes: dict[str, Path] | None = None, router: FakeRouter | None = None,
                 d_sae: int = 1024, act_d: int = 256) -> None:
        self.model_config = SimpleNamespace(
            max_model_len=max_model_len, hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"]),
            dtype="torch.float32", get_total_num_hidden_layers=lambda: 4,
            get_hidden_size=lambda: 256, get_vocab_size=lambda: vocab_size)
        self.vllm_config = SimpleNamespace(
            parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1,
                                            data_parallel_size=1, distributed_executor_backend="mp"),
            additional_config=AdditionalConfig(WorkerConfig(
                saes=tuple(SAEEntry(id=k, path=str(p)) for k, p in (saes or {}).items()),
                max_interventions=8)))
        self.tokenizer = tokenizer or SimpleNamespace(encode=lambda text: [1] * len(text),
                                                      chat_template=None,
                                                      decode=lambda ids, **kw: "x" * len(ids))
        self.step_s = step_s
        self.text = "x" * text_len
        self.fail_after = fail_after
        self.router = router
        self.d_sae = d_sae
        self.act_d = act_d  # every activation site's width
        self.aborted: list[str] = []
        self.prompts: list[dict] = []
        self.steps = 0
        self.running = 0
        self.errored = False

    def get_tokenizer(self):
        return self.tokenizer

    def get_num_unfinished_requests(self) -> int:
        return self.running

    def _reads(self, payload, pos0: int, tokens: int) -> None:
        """Deliver the reads of positions [pos0, pos0 + tokens) to the router."""
        if self.router is None or payload is None or payload.rid not in self.router.buffers:
            return
        buf = self.router.buffers[payload.rid]
        pos = np.arange(pos0, pos0 + tokens)
        for j, r in enumerate(payload.reads):
            feats = np.arange(self.d_sae)
            vals = np.array([[read_value(int(p), int(f)) for f in feats] for p in pos],
                            dtype=np.float32).reshape(len(pos), self.d_sae)
            k = r.top_k
            order = np.argsort(-vals, axis=1, kind="stable")[:, :k].astype(np.int32)
            top = np.take_along_axis(vals, order, axis=1)
            watch = vals[:, list(r.watch)] if r.watch else np.zeros((len(pos), 0), np.float32)
            rec = ReadRecord(rid=payload.rid, read=j, sae=r.sae, pos0=pos0, n=len(pos), k=k,
                             idx=order.tobytes(), val=top.astype(np.float32).tobytes(),
                             w=len(r.watch), wv=np.ascontiguousarray(watch, np.float32).tobytes(),
                             **({"psum": vals.sum(0).tobytes(), "pmax": vals.max(0).tobytes()}
                                if payload.pooled else {}))
            buf.add(rec)
        for j, a in enumerate(payload.acts):  # every position's row; the server selects
            buf.add_act(ActRecord(rid=payload.rid, read=j, site=a.site, pos0=pos0, n=len(pos),
                                  d=self.act_d, data=act_rows(a.site, pos, self.act_d).tobytes()))

    async def generate(self, prompt, params, request_id):
        self.running += 1
        self.prompts.append(dict(prompt))
        payload = decode_request(params.extra_args)
        ids = list(prompt["prompt_token_ids"])
        try:
            n = params.max_tokens
            self._reads(payload, 0, len(ids))
            for i in range(n):
                await asyncio.sleep(self.step_s)
                self.steps += 1
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("boom")
                if i:
                    self._reads(payload, len(ids) + i - 1, 1)  # the previous token was fed
                done = i == n - 1
                yield SimpleNamespace(
                    finished=done, prompt_logprobs=None, num_cached_tokens=0,
                    outputs=[SimpleNamespace(token_ids=[7], text=self.text, logprobs=None,
                                             finish_reason="length" if done else None)])
        finally:
            self.running -= 1

    async def abort(self, request_id):
        self.aborted.append(request_id)
