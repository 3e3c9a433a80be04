"""``steerd labels build``: feature statistics and automatic labels for any SAE, from a text corpus.

The model runs in plain torch (Hugging Face ``transformers``, float32, CPU) over the corpus,
tokenized with the model's tokenizer and cut into contexts of ``context`` tokens (each
prefixed with BOS where the tokenizer has one; the BOS position is not counted). The SAE's
site is hooked as ``sae_runtime.labels.hf_sites`` describes it, and every token's activation
is encoded with ``sae_runtime.ops.encode``. Per feature (a feature *fires* where its
activation is non-zero):

- ``density`` = firing tokens / tokens; ``max_activation``; ``mean_activation`` over firing
  tokens;
- ``examples``: the ``n_examples`` highest activations at distinct positions, with text
  around the token. A running top-k per feature, merged batch by batch (``torch.topk`` over
  the batch's tokens and the k kept so far): the same result as a heap per feature, without
  a Python push per firing token;
- ``top_tokens``: tokens ranked by activation mass (the sum of the feature's activations
  over the token's occurrences), exact, from a sparse (feature, token) accumulator;
- ``promoted`` / ``suppressed``: logit effects (``sae_runtime.labels.logit_effects``);
- ``label``: made from the tokens the feature is most specific to and its promoted tokens,
  e.g. ``"whale, reef, ship → sail"`` (no language model involved). Specific means the
  highest mean activation per occurrence among tokens seen at least ``MIN_TOKEN_COUNT``
  times (ranking by mass would name "the" and "." for every broad feature); the label falls
  back to the top tokens by mass when no token is that frequent. Features that never fire
  go to ``dead_features``.

Resumable: the running statistics are checkpointed every ``checkpoint_every`` contexts to
``<out>.partial`` (one ``.npz``, written atomically); a rerun with the same model, SAE,
corpus (by content), tokens, context and example count continues from it; other arguments
are refused (``restart=True`` starts over). Batches are the same on a resumed run as on an
uninterrupted one, so the output is the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sae_runtime.errors import SAEFormatError, SteeringError
from sae_runtime.labels import logit_effects as lfx
from sae_runtime.labels import store as feats

FORMAT_VERSION = 1  # of the .partial checkpoint
MIN_TOKEN_COUNT = 5  # occurrences a token needs to name a feature in its label


class LabelsBuildError(SteeringError):
    """Bad arguments or inputs to ``steerd labels build``."""


@dataclass(frozen=True)
class BuildConfig:
    model: Path
    sae: Path
    corpus: Path
    hook_name: str | None = None
    tokens: int = 200_000
    """Corpus tokens to read at most (BOS not counted)."""
    context: int = 128
    """Corpus tokens per context."""
    batch: int = 8
    """Contexts per forward pass."""
    n_examples: int = 10
    n_top_tokens: int = 10
    n_logits: int = 10
    window: int = 12
    """Tokens of text shown before an example's token (half as many after it)."""
    checkpoint_every: int = 64
    """Contexts between checkpoints (rounded up to a multiple of ``batch``)."""
    out: Path | None = None
    """Output file (default: ``<sae>/feature_labels.json``)."""

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.sae) / feats.LABELS_FILE

    @property
    def partial_path(self) -> Path:
        return self.out_path.with_name(self.out_path.name + ".partial")


@dataclass
class _Stats:
    """Running statistics; every array is what the checkpoint stores."""

    contexts_done: int
    n_tokens: int
    norm_sum: float
    fires: torch.Tensor  # [d_sae] int64
    act_sum: torch.Tensor  # [d_sae] float64
    act_max: torch.Tensor  # [d_sae] float32 (-inf: never fired)
    ex_val: torch.Tensor  # [N, d_sae] float32, -inf = empty slot
    ex_loc: torch.Tensor  # [N, d_sae] int64: context * (context + 1) + position
    mass_key: torch.Tensor  # [M] int64, sorted: feature * vocab + token
    mass_val: torch.Tensor  # [M] float64
    tok_count: torch.Tensor  # [vocab] int64: occurrences of each token

    @classmethod
    def empty(cls, d_sae: int, n: int, vocab: int) -> _Stats:
        return cls(0, 0, 0.0, torch.zeros(d_sae, dtype=torch.int64),
                   torch.zeros(d_sae, dtype=torch.float64),
                   torch.full((d_sae,), -torch.inf), torch.full((n, d_sae), -torch.inf),
                   torch.zeros((n, d_sae), dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, dtype=torch.float64), torch.zeros(vocab, dtype=torch.int64))

    def save(self, path: Path, identity: dict) -> None:
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps({"version": FORMAT_VERSION, **identity})),
                 counters=np.array([self.contexts_done, self.n_tokens], dtype=np.int64),
                 norm_sum=np.array(self.norm_sum, dtype=np.float64),
                 **{k: getattr(self, k).numpy() for k in (
                     "fires", "act_sum", "act_max", "ex_val", "ex_loc", "mass_key", "mass_val", "tok_count")})
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, identity: dict) -> _Stats:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                data = {k: torch.from_numpy(z[k].copy()) for k in (
                    "fires", "act_sum", "act_max", "ex_val", "ex_loc", "mass_key", "mass_val", "tok_count")}
                done, n_tokens = (int(v) for v in z["counters"])
                norm_sum = float(z["norm_sum"])
        except (OSError, ValueError, KeyError) as e:
            raise LabelsBuildError(f"{path}: cannot read the checkpoint ({e}); pass --restart to "
                                   f"start over") from None
        want = {"version": FORMAT_VERSION, **identity}
        diff = [k for k in want if meta.get(k) != want[k]]
        if diff:
            shown = "; ".join(f"{k}: checkpoint has {meta.get(k)!r}, this run {want[k]!r}" for k in diff)
            raise LabelsBuildError(
                f"{path} is a checkpoint of a different build ({shown}). Rerun with the same "
                f"arguments to resume it, or pass --restart to discard it and start over")
        return cls(done, n_tokens, norm_sum, **data)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenize_corpus(path: Path, tokenizer, limit: int) -> list[int]:
    """The first ``limit`` tokens of the corpus file (tokenized a block of lines at a time)."""
    ids: list[int] = []
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            lines.append(line)
            if len(lines) == 256:
                ids.extend(tokenizer("".join(lines), add_special_tokens=False, verbose=False)["input_ids"])
                lines = []
                if len(ids) >= limit:
                    break
    if lines and len(ids) < limit:
        ids.extend(tokenizer("".join(lines), add_special_tokens=False, verbose=False)["input_ids"])
    return ids[:limit]


def contexts(ids: list[int], size: int, bos: int | None) -> list[list[int]]:
    pre = [] if bos is None else [bos]
    return [pre + ids[i:i + size] for i in range(0, len(ids), size)]


def _check_inputs(cfg: BuildConfig) -> None:
    if not Path(cfg.corpus).is_file():
        raise LabelsBuildError(f"--corpus {cfg.corpus}: no such file")
    if not Path(cfg.model).is_dir():
        raise LabelsBuildError(f"--model {cfg.model}: not a model directory")
    for name in ("tokens", "context", "batch", "n_examples", "n_top_tokens", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise LabelsBuildError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.n_logits < 0 or cfg.window < 0:
        raise LabelsBuildError("n_logits and window must not be negative")


def build(cfg: BuildConfig, *, restart: bool = False, progress: bool = True,
          stop_after: int | None = None) -> Path | None:
    """Build the labels file; returns its path, or None when ``stop_after`` contexts (a test
    hook: rounded up to a whole batch) were done and the run stopped after checkpointing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_runtime.labels.hf_sites import SITES, edit_site
    from sae_runtime.loading import load_sae
    from sae_runtime.ops import encode

    _check_inputs(cfg)
    sae = load_sae(cfg.sae, cfg.hook_name)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
    ids = tokenize_corpus(Path(cfg.corpus), tokenizer, cfg.tokens)
    if not ids:
        raise LabelsBuildError(f"--corpus {cfg.corpus}: no tokens (the file is empty)")
    ctxs = contexts(ids, cfg.context, tokenizer.bos_token_id)
    offset = 0 if tokenizer.bos_token_id is None else 1  # corpus tokens start here in a context
    model = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype=torch.float32).eval()
    if model.config.model_type not in SITES:
        raise LabelsBuildError(f"model type {model.config.model_type!r} is not supported by labels "
                               f"build (supported: {', '.join(SITES)})")
    n_layers = model.config.get_text_config().num_hidden_layers
    if sae.cfg.layer >= n_layers:
        raise LabelsBuildError(f"SAE {cfg.sae} hooks layer {sae.cfg.layer} ({sae.cfg.hook_name}) "
                               f"but the model has {n_layers} layers")
    vocab = int(model.get_output_embeddings().weight.shape[0])
    identity = {"model": str(Path(cfg.model).resolve()), "sae": str(Path(cfg.sae).resolve()),
                "hook_name": sae.cfg.hook_name, "corpus_sha256": file_sha256(Path(cfg.corpus)),
                "tokens": cfg.tokens, "context": cfg.context, "n_examples": cfg.n_examples}
    d_sae = sae.cfg.d_sae
    part = cfg.partial_path
    part.parent.mkdir(parents=True, exist_ok=True)
    if restart and part.exists():
        part.unlink()
    st = _Stats.load(part, identity) if part.exists() else _Stats.empty(d_sae, cfg.n_examples, vocab)
    every = -(-cfg.checkpoint_every // cfg.batch) * cfg.batch
    stride = cfg.context + 1  # ex_loc = context index * stride + position

    bar = _Progress(len(ctxs), st.contexts_done, progress)
    seen: dict[str, torch.Tensor] = {}

    def grab(x: torch.Tensor) -> torch.Tensor:
        seen["x"] = x.detach()
        return x

    try:
        with torch.no_grad(), edit_site(model, sae.cfg.layer, sae.cfg.read_site, grab):
            while st.contexts_done < len(ctxs):
                lo = st.contexts_done
                chunk = ctxs[lo:lo + cfg.batch]
                width = max(len(c) for c in chunk)
                inp = torch.zeros(len(chunk), width, dtype=torch.int64)
                valid = torch.zeros(len(chunk), width, dtype=torch.bool)
                for r, c in enumerate(chunk):
                    inp[r, :len(c)] = torch.tensor(c)
                    valid[r, offset:len(c)] = True
                model(input_ids=inp)  # right padding: causal attention keeps valid rows exact
                x = seen["x"].float()
                if x.shape[-1] != sae.cfg.d_in:
                    raise LabelsBuildError(
                        f"SAE {cfg.sae} has d_in={sae.cfg.d_in} but the model's activation at "
                        f"{sae.cfg.hook_name} is {x.shape[-1]} wide: is it the SAE of this model?")
                _update(st, sae, encode, x[valid], inp[valid],
                        (torch.arange(lo, lo + len(chunk))[:, None] * stride
                         + torch.arange(width)[None, :])[valid], vocab)
                st.contexts_done += len(chunk)
                bar.update(len(chunk))
                stop = stop_after is not None and st.contexts_done >= stop_after
                if st.contexts_done % every == 0 or stop:
                    st.save(part, identity)
                if stop and st.contexts_done < len(ctxs):
                    return None
    finally:
        bar.close()
    doc = _result(cfg, sae, st, ctxs, tokenizer, identity, vocab)
    out = cfg.out_path
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    os.replace(tmp, out)
    part.unlink(missing_ok=True)
    return out


def _update(st: _Stats, sae, encode, x: torch.Tensor, tok: torch.Tensor, loc: torch.Tensor,
            vocab: int) -> None:
    acts = encode(sae, x)  # [n, d_sae]
    on = acts != 0
    n_ex = st.ex_val.shape[0]
    k = min(n_ex, acts.shape[0])
    val, rows = acts.topk(k, dim=0)  # [k, d_sae]
    val = torch.where(val > 0, val, -torch.inf)  # a zero (or negative) is not an example
    all_val = torch.cat([st.ex_val, val])
    all_loc = torch.cat([st.ex_loc, loc[rows]])
    keep_val, keep = all_val.topk(n_ex, dim=0)
    rr, ff = on.nonzero(as_tuple=True)
    keys = ff.to(torch.int64) * vocab + tok[rr]
    uk, inv = torch.unique(keys, return_inverse=True)
    uv = torch.zeros(len(uk), dtype=torch.float64).index_add_(0, inv, acts[rr, ff].double())
    # merge into the sorted accumulator
    mk = torch.cat([st.mass_key, uk])
    mv = torch.cat([st.mass_val, uv])
    mk, minv = torch.unique(mk, return_inverse=True)
    mass = torch.zeros(len(mk), dtype=torch.float64).index_add_(0, minv, mv)
    # commit
    st.fires += on.sum(0)
    st.act_sum += acts.sum(0, dtype=torch.float64)
    st.act_max = torch.maximum(st.act_max, torch.where(on, acts, -torch.inf).amax(0))
    st.ex_val, st.ex_loc = keep_val, all_loc.gather(0, keep)
    st.mass_key, st.mass_val = mk, mass
    st.tok_count += torch.bincount(tok, minlength=vocab)
    st.n_tokens += int(x.shape[0])
    st.norm_sum += float(x.norm(dim=-1).double().sum())


def _result(cfg: BuildConfig, sae, st: _Stats, ctxs: list[list[int]], tokenizer,
            identity: dict, vocab: int) -> dict:
    d_sae = sae.cfg.d_sae
    stride = cfg.context + 1
    feat_of = (st.mass_key // vocab).tolist()
    tok_of = (st.mass_key % vocab).tolist()
    by_feat: dict[int, list[tuple[float, int]]] = {}
    for f, t, m in zip(feat_of, tok_of, st.mass_val.tolist(), strict=True):
        by_feat.setdefault(f, []).append((m, t))
    live = [f for f in range(d_sae) if st.fires[f] > 0]
    effects, reason = _logit_effects(cfg, sae, live, tokenizer)

    def text(t: list[int]) -> str:
        return tokenizer.decode(t)

    features = []
    offset = 0 if tokenizer.bos_token_id is None else 1
    right = cfg.window // 2
    for f in live:
        ranked = sorted(by_feat.get(f, ()), key=lambda mt: (-mt[0], mt[1]))
        top = _distinct_tokens([t for m, t in ranked if m > 0], tokenizer, cfg.n_top_tokens)
        count = st.tok_count
        specific = sorted(((m / int(count[t]), t) for m, t in ranked
                           if m > 0 and int(count[t]) >= MIN_TOKEN_COUNT), key=lambda mt: (-mt[0], mt[1]))
        label_tokens = _distinct_tokens([t for _, t in specific], tokenizer, 3) or top
        ex = []
        for v, loc in zip(st.ex_val[:, f].tolist(), st.ex_loc[:, f].tolist(), strict=True):
            if v == -float("inf"):
                continue
            c, p = divmod(loc, stride)
            ids = ctxs[c]
            ex.append({"context": text(ids[max(offset, p - cfg.window):p]), "token": text([ids[p]]),
                       "after": text(ids[p + 1:p + 1 + right]), "activation": round(v, 5)})
        e = effects.get(f)
        rec = {
            "index": f,
            "label": auto_label(label_tokens, [t.token for t in e.promoted] if e else []),
            "density": round(int(st.fires[f]) / st.n_tokens, 7),
            "max_activation": round(float(st.act_max[f]), 5),
            "mean_activation": round(float(st.act_sum[f]) / int(st.fires[f]), 5),
            "top_tokens": top,
            "examples": ex,
        }
        if e is not None:
            rec["promoted"] = [asdict(t) for t in e.promoted]
            rec["suppressed"] = [asdict(t) for t in e.suppressed]
        features.append(rec)
    return {
        "format": feats.FORMAT,
        "sae": Path(cfg.sae).resolve().name,
        "d_sae": d_sae,
        "labelling_tokens": st.n_tokens,
        "site_norm": round(st.norm_sum / max(st.n_tokens, 1), 5),
        "method": "steerd labels build (sae_runtime/labels/build.py): per-feature statistics over "
                  "a text corpus; labels from top tokens and promoted tokens",
        "build": identity,
        "logit_effects_unavailable": reason,
        "dead_features": [f for f in range(d_sae) if st.fires[f] == 0],
        "features": features,
    }


def _logit_effects(cfg: BuildConfig, sae, live: list[int], tokenizer
                   ) -> tuple[dict[int, lfx.Effects], str]:
    if cfg.n_logits == 0 or not live:
        return {}, ""
    unemb = lfx.Unembedding(cfg.model)
    try:
        reason = lfx.unavailable_reason(sae.cfg, unemb.hidden_size)
    except SAEFormatError as e:
        return {}, str(e)
    if reason:
        return {}, reason
    w = lfx.model_space_decoder(sae.cfg, sae.W_dec)
    out: dict[int, lfx.Effects] = {}
    for i in range(0, len(live), 256):
        idx = live[i:i + 256]
        rows = lfx.top_effects(unemb.logits(w[idx]), cfg.n_logits, lambda t: tokenizer.decode([t]))
        out.update(zip(idx, rows, strict=True))
    return out, ""


def _distinct_tokens(ids: list[int], tokenizer, n: int) -> list[str]:
    out: list[str] = []
    for t in ids:
        raw = tokenizer.decode([t])
        s = raw.strip() or repr(raw)
        if s not in out:
            out.append(s)
        if len(out) == n:
            break
    return out


def auto_label(top_tokens: list[str], promoted: list[str], n_top: int = 3, n_promoted: int = 2) -> str:
    """``"whale, reef, ship → sail, wave"``: the first top tokens, then promoted tokens not
    already among them (just the top tokens when nothing new is promoted)."""
    head = top_tokens[:n_top]
    extra: list[str] = []
    for t in promoted:
        s = t.strip()
        if s and s not in head and s not in extra:
            extra.append(s)
        if len(extra) == n_promoted:
            break
    label = ", ".join(head)
    if extra:
        label = f"{label} → {', '.join(extra)}" if label else f"→ {', '.join(extra)}"
    return label


class _Progress:
    """tqdm on stderr when installed, else a plain progress line."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.n, self.enabled = total, initial, enabled
        self.bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="ctx", desc="labels build",
                            file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self._line()

    def _line(self) -> None:
        print(f"\rlabels build: {self.n}/{self.total} contexts", end="", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)
