"""Locust load test for steerd (``steering.v1.SteeringService`` over gRPC).

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 2m --host 127.0.0.1:50051 \\
        --csv loadtests/reports/run --html loadtests/reports/run.html

Each user discovers the server (ListSAEs, GetModelInfo) when it starts, then runs a mix of
tasks: plain generation, steered generation, generation with feature reads, long prompts,
generations cancelled mid-stream, and Encode. Besides the RPC times Locust reports
``METRIC`` rows: TTFT (ms), TPOT (ms per token after the first) and tokens/s per stream.
Options (``locust --help``, section "custom arguments", or LOCUST_* environment variables)
and the reported rows are described in loadtests/README.md.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import gevent
from locust import events, task

from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc as pb_grpc

try:
    from loadtests.grpc_user import GrpcUser, ResponseCheckError, StreamResult
    from loadtests.read_sequence import read_sequence_errors
except ModuleNotFoundError:  # locust -f locustfile.py run from inside loadtests/
    from grpc_user import GrpcUser, ResponseCheckError, StreamResult
    from read_sequence import read_sequence_errors

KINDS = ("plain", "steered", "reading", "long", "cancel", "encode")
DEFAULT_WEIGHTS = {"plain": 4, "steered": 4, "reading": 2, "long": 1, "cancel": 1, "encode": 1}
NEEDS_SAES = {"steered", "reading", "encode"}

# Steering mix: how many interventions a steered request carries, and which modes.
N_INTERVENTIONS = {1: 0.4, 2: 0.3, 3: 0.2, 4: 0.1}
MODES = {pb.INTERVENTION_MODE_CLAMP: 0.45, pb.INTERVENTION_MODE_ADD: 0.35,
         pb.INTERVENTION_MODE_SCALE: 0.12, pb.INTERVENTION_MODE_ABLATE: 0.08}
HOT_FEATURES = 32  # per SAE: the features most users steer/watch (shared by all users)
HOT_FRACTION = 0.6
READ_SCOPES = {pb.READ_SCOPE_ALL: 0.6, pb.READ_SCOPE_GENERATION: 0.25, pb.READ_SCOPE_PROMPT: 0.15}

WORDS = ("the ocean wave rolled over a quiet harbor while gulls circled above old boats and "
         "a lighthouse keeper wrote letters about storms winter bread music rivers mountains "
         "trains clocks gardens engines stars paper lanterns").split()


# ----------------------------------------------------------------------------- options

@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    for kind in KINDS:
        parser.add_argument(f"--weight-{kind}", type=int, default=DEFAULT_WEIGHTS[kind],
                            env_var=f"LOCUST_WEIGHT_{kind.upper()}",
                            help=f"relative weight of the '{kind}' task (0 disables it)")
    parser.add_argument("--mix-order", choices=("deck", "random"), default="deck",
                        env_var="LOCUST_MIX_ORDER",
                        help="deck: each user draws tasks from a shuffled deck holding every "
                             "kind weight times (every kind runs early, exact proportions); "
                             "random: independent weighted draws")
    ints = (("gen-tokens-min", 16, "fewest tokens a generation asks for"),
            ("gen-tokens-max", 64, "most tokens a generation asks for"),
            ("prompt-tokens-min", 8, "shortest ordinary prompt (tokens, or bytes for text)"),
            ("prompt-tokens-max", 64, "longest ordinary prompt (tokens, or bytes for text)"),
            ("long-prompt-tokens-min", 256, "shortest long prompt (clipped to max_model_len)"),
            ("long-prompt-tokens-max", 1024, "longest long prompt (clipped to max_model_len)"),
            ("read-top-k", 16, "largest top_k of a feature read (clipped to the server cap)"),
            ("max-steer", 4, "most interventions in a steered request (clipped to the cap)"),
            ("cancel-after-max", 8, "cancel after 1..N stream messages"),
            ("shared-prefix-tokens", 32, "length of the prompt prefix shared by all users"))
    for name, default, help_ in ints:
        parser.add_argument(f"--{name}", type=int, default=default,
                            env_var="LOCUST_" + name.upper().replace("-", "_"), help=help_)
    floats = (("temperature", 0.8, "sampling temperature"),
              ("top-p", 0.95, "nucleus sampling mass"),
              ("shared-prefix-frac", 0.3, "fraction of prompts that start with the shared "
                                          "prefix (exercises the prefix cache)"),
              ("think-time", 0.5, "each user waits uniform(0, this) seconds between tasks"),
              ("rpc-timeout", 300.0, "deadline of each RPC in seconds"))
    for name, default, help_ in floats:
        parser.add_argument(f"--{name}", type=float, default=default,
                            env_var="LOCUST_" + name.upper().replace("-", "_"), help=help_)
    parser.add_argument("--stop-at-eos", action="store_true", default=False,
                        env_var="LOCUST_STOP_AT_EOS",
                        help="let generations stop at EOS (default: ignore_eos, so every "
                             "generation yields exactly the tokens it asked for)")
    parser.add_argument("--tpot-log", default="", env_var="LOCUST_TPOT_LOG",
                        help="append 'unix_time tpot_ms' per finished stream to this file "
                             "(loadtests/soak.py reads it for per-interval p99 TPOT)")
    parser.add_argument("--metrics-per-task", action="store_true", default=False,
                        env_var="LOCUST_METRICS_PER_TASK",
                        help="also report TTFT/TPOT/tokens/s per task kind ('TTFT steered', ...)")


@dataclass(frozen=True)
class Options:
    weights: dict[str, int]
    mix_order: str
    gen_tokens: tuple[int, int]
    prompt_tokens: tuple[int, int]
    long_prompt_tokens: tuple[int, int]
    read_top_k: int
    max_steer: int
    cancel_after_max: int
    shared_prefix_tokens: int
    temperature: float
    top_p: float
    shared_prefix_frac: float
    think_time: float
    rpc_timeout: float
    ignore_eos: bool
    metrics_per_task: bool
    tpot_log: str = ""

    @classmethod
    def from_parsed(cls, o) -> Options:
        def span(lo: int, hi: int) -> tuple[int, int]:
            lo = max(1, lo)
            return lo, max(lo, hi)

        def get(name, default):
            return getattr(o, name, default) if o is not None else default

        return cls(
            weights={k: max(0, int(get(f"weight_{k}", DEFAULT_WEIGHTS[k]))) for k in KINDS},
            mix_order=get("mix_order", "deck"),
            gen_tokens=span(get("gen_tokens_min", 16), get("gen_tokens_max", 64)),
            prompt_tokens=span(get("prompt_tokens_min", 8), get("prompt_tokens_max", 64)),
            long_prompt_tokens=span(get("long_prompt_tokens_min", 256),
                                    get("long_prompt_tokens_max", 1024)),
            read_top_k=max(1, get("read_top_k", 16)),
            max_steer=max(1, get("max_steer", 4)),
            cancel_after_max=max(1, get("cancel_after_max", 8)),
            shared_prefix_tokens=max(0, get("shared_prefix_tokens", 32)),
            temperature=get("temperature", 0.8), top_p=get("top_p", 0.95),
            shared_prefix_frac=get("shared_prefix_frac", 0.3),
            think_time=max(0.0, get("think_time", 0.5)),
            rpc_timeout=get("rpc_timeout", 300.0),
            ignore_eos=not get("stop_at_eos", False),
            metrics_per_task=bool(get("metrics_per_task", False)),
            tpot_log=get("tpot_log", "") or "",
        )


_LOG_FILES: dict[str, TextIO] = {}


def _log_file(path: str) -> TextIO:
    """One line-buffered append handle per path for the whole Locust process."""
    if path not in _LOG_FILES:
        _LOG_FILES[path] = open(path, "a", buffering=1)  # noqa: SIM115 - closed at exit
    return _LOG_FILES[path]


def _choice(rng: random.Random, weighted: dict):
    return rng.choices(list(weighted), weights=list(weighted.values()))[0]


def hot_features(sae: pb.SAEInfo) -> list[int]:
    """The same few features for every user of every process: popular steering targets."""
    r = random.Random(f"hot:{sae.id}:{sae.d_sae}")
    return r.sample(range(sae.d_sae), min(HOT_FEATURES, sae.d_sae))


# ----------------------------------------------------------------------------- the user

class SteeringUser(GrpcUser):
    """One client of steerd running the task mix (see the module docstring)."""

    stub_class = pb_grpc.SteeringServiceStub

    def wait_time(self) -> float:
        return self.rng.uniform(0.0, self.opts.think_time)

    def __init__(self, environment) -> None:
        self.opts = Options.from_parsed(environment.parsed_options)
        self.rpc_timeout = self.opts.rpc_timeout
        super().__init__(environment)
        self.rng = random.Random()
        self.deck: list[str] = []
        self.ready = False

    # -- discovery --------------------------------------------------------------------
    def on_start(self) -> None:
        # Options again: in distributed runs the master's arguments reach the workers with
        # the first spawn message, after the user class was imported.
        self.opts = Options.from_parsed(self.environment.parsed_options)
        self.client.timeout = self.opts.rpc_timeout
        self.ready = self.discover()

    def discover(self) -> bool:
        """ListSAEs + GetModelInfo; False (failure already reported) if either fails."""
        saes = self.client.unary("ListSAEs", pb.ListSAEsRequest())
        info = self.client.unary("GetModelInfo", pb.GetModelInfoRequest())
        if saes is None or info is None:
            return False
        self.saes = list(saes.saes)
        self.info = info
        self.hot = {s.id: hot_features(s) for s in self.saes}
        self.max_len = info.max_model_len
        self.vocab = info.vocab_size
        prefix_rng = random.Random(f"prefix:{self.vocab}")  # identical in every user
        self.shared_prefix = [prefix_rng.randrange(self.vocab)
                              for _ in range(min(self.opts.shared_prefix_tokens,
                                                 self.max_len // 4))]
        self.weights = {k: w for k, w in self.opts.weights.items()
                        if w > 0 and (self.saes or k not in NEEDS_SAES)}
        if not self.weights:
            self.weights = {"plain": 1}
        return True

    def next_kind(self) -> str:
        if self.opts.mix_order == "random":
            return _choice(self.rng, self.weights)
        if not self.deck:
            self.deck = [k for k, w in self.weights.items() for _ in range(w)]
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    @task
    def run_one(self) -> None:
        if not self.ready:  # the server was unreachable at start: retry, at most 1/s
            self.ready = self.discover()
            if not self.ready:
                gevent.sleep(1.0)
                return
        getattr(self, f"task_{self.next_kind()}")()

    # -- request building -------------------------------------------------------------
    def token_prompt(self, n: int) -> list[int]:
        ids: list[int] = []
        if self.shared_prefix and self.rng.random() < self.opts.shared_prefix_frac:
            ids = list(self.shared_prefix[:n])
        ids += [self.rng.randrange(self.vocab) for _ in range(n - len(ids))]
        return ids

    def short_prompt(self) -> tuple[pb.Prompt, int]:
        """A prompt and an upper bound on its token count."""
        n = self.rng.randint(*self.opts.prompt_tokens)
        n = max(1, min(n, self.max_len - 1))
        if self.rng.random() < 0.5:
            words: list[str] = []
            while len(" ".join(words)) < n:
                words.append(self.rng.choice(WORDS))
            text = " ".join(words)[:n].strip() or "the"
            # Any byte-level tokenizer: at most one token per byte, plus BOS/EOS-like extras.
            return pb.Prompt(text=text), len(text.encode()) + 2
        return pb.Prompt(token_ids=pb.TokenIds(ids=self.token_prompt(n))), n

    def long_prompt(self, max_tokens: int) -> tuple[pb.Prompt, int]:
        n = self.rng.randint(*self.opts.long_prompt_tokens)
        n = max(1, min(n, self.max_len - max_tokens))
        return pb.Prompt(token_ids=pb.TokenIds(ids=self.token_prompt(n))), n

    def gen_tokens(self, prompt_bound: int, lo: int | None = None, hi: int | None = None) -> int:
        lo = lo or self.opts.gen_tokens[0]
        hi = hi or self.opts.gen_tokens[1]
        return max(1, min(self.rng.randint(lo, max(lo, hi)), self.max_len - prompt_bound))

    def sampling(self, max_tokens: int) -> pb.SamplingParams:
        return pb.SamplingParams(max_tokens=max_tokens, temperature=self.opts.temperature,
                                 top_p=self.opts.top_p, ignore_eos=self.opts.ignore_eos)

    def pick_feature(self, sae: pb.SAEInfo) -> int:
        if self.rng.random() < HOT_FRACTION:
            return self.rng.choice(self.hot[sae.id])
        return self.rng.randrange(sae.d_sae)

    def interventions(self) -> list[pb.Intervention]:
        """1-4 edits: mostly CLAMP/ADD, some SCALE/ABLATE, on popular or random features."""
        n = min(_choice(self.rng, N_INTERVENTIONS), self.opts.max_steer,
                self.info.max_interventions or 1)
        out, seen = [], set()
        for _ in range(n * 4):  # bounded: duplicates are redrawn a few times at most
            if len(out) == n:
                break
            sae = self.rng.choice(self.saes)
            feature = self.pick_feature(sae)
            if (sae.id, feature) in seen:
                continue
            seen.add((sae.id, feature))
            mode = _choice(self.rng, MODES)
            if mode == pb.INTERVENTION_MODE_CLAMP:
                value = self.rng.uniform(2.0, 40.0)
            elif mode == pb.INTERVENTION_MODE_ADD:
                value = self.rng.uniform(1.0, 20.0) * (1 if self.rng.random() < 0.8 else -1)
            elif mode == pb.INTERVENTION_MODE_SCALE:
                value = self.rng.choice((0.0, 0.25, 0.5, 2.0, 4.0, 8.0))
            else:
                value = 0.0
            scope = pb.SCOPE_GENERATION_ONLY if self.rng.random() < 0.15 else pb.SCOPE_ALL
            out.append(pb.Intervention(sae=sae.id, feature=feature, mode=mode, value=value,
                                       scope=scope))
        return out

    def reads(self, scoped: bool = True) -> list[pb.FeatureRead]:
        """1-2 SAEs: top-k per position, sometimes a watch list of popular features."""
        n = min(1 if self.rng.random() < 0.7 else 2, len(self.saes))
        out = []
        for sae in self.rng.sample(self.saes, n):
            cap = min(self.opts.read_top_k, self.info.max_read_top_k or 1, sae.d_sae)
            watch: list[int] = []
            n_watch = min(self.rng.randint(1, 8), self.info.max_watch, len(self.hot[sae.id]))
            if self.rng.random() < 0.5 and n_watch > 0:
                watch = self.rng.sample(self.hot[sae.id], n_watch)
            scope = _choice(self.rng, READ_SCOPES) if scoped else pb.READ_SCOPE_ALL
            out.append(pb.FeatureRead(sae=sae.id, top_k=self.rng.randint(1, cap), watch=watch,
                                      scope=scope))
        return out

    def request(self, kind: str, prompt: pb.Prompt, max_tokens: int,
                interventions: Sequence[pb.Intervention] = (),
                reads: Sequence[pb.FeatureRead] = ()) -> pb.GenerateRequest:
        return pb.GenerateRequest(prompt=prompt, sampling=self.sampling(max_tokens),
                                  interventions=list(interventions), reads=list(reads),
                                  request_id=f"locust-{kind}-{uuid.uuid4().hex[:16]}")

    # -- running and checking ---------------------------------------------------------
    def generate(self, kind: str, req: pb.GenerateRequest, cancel_after: int | None = None):
        def check(r: StreamResult) -> None:
            if r.cancelled or r.finished_before_cancel:
                return
            check_complete(req, r, ignore_eos=self.opts.ignore_eos)
            if req.reads:
                check_reads(req, r)

        result = self.client.stream("Generate", req, name=f"Generate {kind}",
                                    cancel_after=cancel_after, check=check)
        if result is not None:
            self.report_metrics(kind, result)
        return result

    def report_metrics(self, kind: str, r: StreamResult) -> None:
        values = [("TTFT", r.ttft_ms, 0), ("TPOT", r.tpot_ms, r.tokens)]
        if not (r.cancelled or r.finished_before_cancel):
            values.append(("tokens/s", r.tokens_per_s, r.tokens))  # whole streams only
        if self.opts.tpot_log and r.tpot_ms is not None:
            _log_file(self.opts.tpot_log).write(f"{time.time():.3f} {r.tpot_ms:.3f}\n")
        for name, value, length in values:
            self.client.metric(name, value, length)
            if self.opts.metrics_per_task:
                self.client.metric(f"{name} {kind}", value, length)

    # -- tasks (picked by run_one) --------------------------------------------------------
    def task_plain(self) -> None:
        prompt, bound = self.short_prompt()
        self.generate("plain", self.request("plain", prompt, self.gen_tokens(bound)))

    def task_steered(self) -> None:
        prompt, bound = self.short_prompt()
        self.generate("steered", self.request("steered", prompt, self.gen_tokens(bound),
                                              interventions=self.interventions()))

    def task_reading(self) -> None:
        prompt, bound = self.short_prompt()
        ivs = self.interventions() if self.rng.random() < 0.3 else []
        self.generate("reading", self.request("reading", prompt, self.gen_tokens(bound),
                                              interventions=ivs, reads=self.reads()))

    def task_long(self) -> None:
        lo = self.opts.gen_tokens[0]
        max_tokens = max(1, min(self.rng.randint(lo, max(lo, self.opts.gen_tokens[1] // 2)),
                                self.max_len // 4))
        prompt, _ = self.long_prompt(max_tokens)
        self.generate("long", self.request("long", prompt, max_tokens))

    def task_cancel(self) -> None:
        prompt, bound = self.short_prompt()
        hi = max(self.opts.gen_tokens[1], 4 * self.opts.cancel_after_max)
        max_tokens = self.gen_tokens(bound, lo=hi, hi=hi)
        cancel_after = self.rng.randint(1, max(1, min(self.opts.cancel_after_max,
                                                      max_tokens - 1)))
        self.generate("cancel", self.request("cancel", prompt, max_tokens),
                      cancel_after=cancel_after)

    def task_encode(self) -> None:
        n = self.rng.randint(1, min(4, self.info.max_encode_inputs or 1))
        inputs = [self.short_prompt()[0] for _ in range(n)]
        req = pb.EncodeRequest(inputs=inputs, reads=self.reads(scoped=False))
        self.client.unary("Encode", req, check=lambda resp: check_encode(req, resp))


# ----------------------------------------------------------------------------- checks

def check_complete(req: pb.GenerateRequest, r: StreamResult, ignore_eos: bool) -> None:
    if not r.messages:
        raise ResponseCheckError("empty stream")
    last = r.messages[-1]
    if last.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        raise ResponseCheckError("stream ended without finish_reason")
    if last.finish_reason == pb.FINISH_REASON_ABORT:
        raise ResponseCheckError("server aborted the request")
    want = req.sampling.max_tokens
    if ignore_eos and (r.tokens != want or last.finish_reason != pb.FINISH_REASON_LENGTH):
        raise ResponseCheckError(f"asked for {want} tokens (ignore_eos), got {r.tokens}, "
                                 f"finish {pb.FinishReason.Name(last.finish_reason)}")
    if not 0 < r.tokens <= want:
        raise ResponseCheckError(f"asked for at most {want} tokens, got {r.tokens}")
    if last.usage.completion_tokens != r.tokens:
        raise ResponseCheckError(f"usage says {last.usage.completion_tokens} tokens, "
                                 f"stream carried {r.tokens}")
    if req.prompt.HasField("token_ids") and \
            list(r.messages[0].prompt_token_ids) != list(req.prompt.token_ids.ids):
        raise ResponseCheckError("prompt_token_ids differ from the prompt sent")


def check_reads(req: pb.GenerateRequest, r: StreamResult) -> None:
    """Each read's positions arrive exactly once, in order, with their token ids and shape."""
    for msg in r.messages:
        for f in msg.features:
            rd = next((x for x in req.reads if x.sae == f.sae), None)
            if rd is None:
                continue  # read_sequence_errors names it
            if len(f.indices) != rd.top_k or len(f.values) != rd.top_k \
                    or len(f.watch_values) != len(rd.watch):
                raise ResponseCheckError(f"{f.sae} position {f.position}: {len(f.indices)} "
                                         f"top-k / {len(f.watch_values)} watch values, asked "
                                         f"{rd.top_k} / {len(rd.watch)}")
    generated = [t for msg in r.messages for t in msg.token_ids]
    errors = read_sequence_errors(
        [(rd.sae, None if rd.HasField("positions") else rd.scope) for rd in req.reads],
        list(r.messages[0].prompt_token_ids), generated,
        [(f.sae, f.position, f.token_id) for msg in r.messages for f in msg.features])
    if errors:
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ResponseCheckError(errors[0] + more)


def check_encode(req: pb.EncodeRequest, resp: pb.EncodeResponse) -> None:
    if len(resp.results) != len(req.inputs):
        raise ResponseCheckError(f"{len(resp.results)} results for {len(req.inputs)} inputs")
    for i, res in enumerate(resp.results):
        if not res.token_ids:
            raise ResponseCheckError(f"results[{i}]: no token_ids")
        if len(res.features) != len(res.token_ids) * len(req.reads):
            raise ResponseCheckError(f"results[{i}]: {len(res.features)} feature entries for "
                                     f"{len(res.token_ids)} tokens x {len(req.reads)} reads")
        if len(res.pooled) != len(req.reads):
            raise ResponseCheckError(f"results[{i}]: {len(res.pooled)} pooled for "
                                     f"{len(req.reads)} reads")
