"""Logit effects of SAE features: the tokens a feature's decoder direction promotes and suppresses.

For feature ``i`` with decoder row ``d = W_dec[i]`` (in the model's space: times the SAE's
``norm_scale_out`` for ``constant_scale`` SAEs), the *direct* effect on the next-token logits
of one unit of activation is::

    logits = W_U @ (g * P d)

- ``g``: the final norm's gain. Llama / Qwen / Mistral ``model.norm.weight``; Gemma's RMSNorm
  scales by ``1 + weight``; GPT-2 ``ln_f.weight``.
- ``P``: identity for an RMSNorm; for a LayerNorm (a final norm with a bias, e.g. GPT-2)
  the mean-removal ``d - mean(d)`` that the norm applies before its gain. The norm's bias
  and its per-token ``1/rms`` are left out: they do not depend on the feature (the scale
  changes every token's logit alike, so the ranking is the same).
- ``W_U``: ``lm_head.weight``, or the input embedding where the head is tied.

This is the path through the final norm and the unembedding only (later layers are not run),
the usual "logit lens" of a decoder direction. Gemma's final logit soft-capping is monotone
and left out. It is defined for SAEs whose output is added to the residual stream (sites
``resid_post``, ``resid_pre``, ``mlp_out``, ``attn_out``) and whose ``d_in`` equals the model's
hidden size; the others get empty lists and the reason.

Weights come from the model directory's safetensors (only the two tensors needed, with
``safe_open``), kept in their stored dtype; logits are computed in float32, a block of
vocabulary rows at a time. ``LogitEffects`` loads lazily, once, under a lock, and caches.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_runtime.errors import SAEFormatError
from sae_runtime.labels.store import TokenLogit
from sae_runtime.saes.base import SAEConfig

DEFAULT_K = 10
WRITES_STREAM = ("resid_post", "resid_pre", "mlp_out", "attn_out")
_ROWS = 8192  # vocabulary rows cast to float32 at a time (Gemma: 8192 x 2304 x 4 B = 75 MB)
# final-norm weight and unembedding names, most specific first (any prefix is accepted, e.g.
# ``language_model.`` in multimodal checkpoints)
_NORMS = ("model.norm.weight", "transformer.ln_f.weight", "ln_f.weight",
          "gpt_neox.final_layer_norm.weight", "model.final_layernorm.weight", "norm.weight")
_HEADS = ("lm_head.weight", "embed_out.weight")
_EMBEDS = ("model.embed_tokens.weight", "transformer.wte.weight", "wte.weight",
           "gpt_neox.embed_in.weight", "embed_tokens.weight")
_ONE_PLUS = ("gemma",)  # model_type prefixes whose RMSNorm multiplies by (1 + weight)


@dataclass(frozen=True)
class Effects:
    promoted: tuple[TokenLogit, ...] = ()
    suppressed: tuple[TokenLogit, ...] = ()
    unavailable: str = ""
    """Why both lists are empty ("" when they are filled)."""


class Unembedding:
    """A model's final-norm gain and unembedding, read from its directory on first use."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._lock = threading.Lock()
        self._loaded: tuple[torch.Tensor, torch.Tensor, bool] | None = None
        self.norm_name = self.head_name = ""

    @property
    def hidden_size(self) -> int:
        return int(self._get()[0].shape[0])

    def _get(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        from safetensors import safe_open

        cfg = _text_config(self.model_dir)
        where = _tensor_files(self.model_dir)
        norm = _find(where, _NORMS)
        head = _find(where, _HEADS)
        if head is None or cfg.get("tie_word_embeddings") is True and not _has_suffix(where, "lm_head.weight"):
            head = _find(where, _EMBEDS)
        if norm is None or head is None:
            missing = "final norm weight" if norm is None else "unembedding (lm_head or embedding)"
            raise SAEFormatError(f"{self.model_dir}: cannot find the model's {missing} in its safetensors "
                                 f"(looked for names ending in {', '.join(_NORMS if norm is None else _HEADS + _EMBEDS)})")
        bias = norm[:-len("weight")] + "bias"

        def get(name: str) -> torch.Tensor:
            with safe_open(str(where[name]), framework="pt") as f:
                return f.get_tensor(name)

        gain = get(norm).float()
        if str(cfg.get("model_type", "")).startswith(_ONE_PLUS):
            gain = 1.0 + gain
        w_u = get(head)
        if w_u.shape[1] != gain.shape[0]:
            raise SAEFormatError(f"{self.model_dir}: {head} is {tuple(w_u.shape)} but {norm} has "
                                 f"{gain.shape[0]} entries")
        self.norm_name, self.head_name = norm, head
        return gain, w_u, bias in where

    def logits(self, d: torch.Tensor) -> torch.Tensor:
        """Direct logit effects ``[n, vocab]`` (float32) of directions ``d [n, hidden]``."""
        gain, w_u, centre = self._get()
        d = d.float()
        if centre:
            d = d - d.mean(dim=-1, keepdim=True)
        v = d * gain
        return torch.cat([v @ w_u[r:r + _ROWS].float().t() for r in range(0, w_u.shape[0], _ROWS)], dim=1)


def top_effects(logits: torch.Tensor, k: int, decode: Callable[[int], str]) -> list[Effects]:
    """The ``k`` most promoted and most suppressed tokens of each row of ``logits [n, vocab]``."""
    k = min(k, logits.shape[1])
    hi = logits.topk(k, dim=1)
    lo = logits.topk(k, dim=1, largest=False)

    def row(vals, ids) -> tuple[TokenLogit, ...]:
        return tuple(TokenLogit(decode(t), t, round(v, 5)) for v, t in zip(vals, ids, strict=True))

    return [Effects(row(hv, hi_ids), row(lv, lo_ids))
            for hv, hi_ids, lv, lo_ids in zip(hi.values.tolist(), hi.indices.tolist(),
                                              lo.values.tolist(), lo.indices.tolist(), strict=True)]


def unavailable_reason(cfg: SAEConfig, hidden_size: int) -> str:
    """Why ``cfg``'s features have no logit effects ("" when they do)."""
    if cfg.site not in WRITES_STREAM:
        return (f"site {cfg.site} ({cfg.hook_name}) is not added to the residual stream directly, "
                f"so its decoder rows have no direct logit effect")
    if cfg.clt_layers:
        return ("a cross-layer transcoder feature writes the MLP output of its layer and every "
                "later one; it has no single direct logit effect")
    if cfg.d_in != hidden_size:
        return f"the SAE's d_in={cfg.d_in} differs from the model's hidden size {hidden_size}"
    return ""


def model_space_decoder(cfg: SAEConfig, w_dec: torch.Tensor) -> torch.Tensor:
    """Decoder rows as the edit they make in the model's space per unit activation (the
    constant scale of ``constant_scale`` SAEs; per-token scales keep the direction)."""
    return w_dec * cfg.norm_scale_out if cfg.normalization == "constant_scale" else w_dec


class LogitEffects:
    """Per-server provider: the model's unembedding and each SAE's decoder, loaded on first use.

    ``saes`` maps SAE id to ``(directory, hook_name override)``; ``configs`` gives their
    configs; ``decode(token_id) -> text``. Thread-safe; every load happens once.
    """

    def __init__(self, model_dir: str | Path, saes: Mapping[str, tuple[str | Path, str | None]],
                 configs: Mapping[str, SAEConfig], decode: Callable[[int], str], k: int = DEFAULT_K):
        self.unembedding = Unembedding(model_dir)
        self.saes = dict(saes)
        self.configs = dict(configs)
        self.decode = decode
        self.k = k
        self._lock = threading.Lock()
        self._dec: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple[str, int], Effects] = {}

    def _decoder(self, sae: str) -> torch.Tensor:
        with self._lock:
            if sae not in self._dec:
                from sae_runtime.loading import load_sae

                path, hook = self.saes[sae]
                loaded = load_sae(path, hook)
                self._dec[sae] = model_space_decoder(loaded.cfg, loaded.W_dec).contiguous()
            return self._dec[sae]

    def get(self, sae: str, index: int) -> Effects:
        """Effects of feature ``index`` of SAE ``sae`` (never raises for a known SAE and a
        valid index: a failure to read the weights becomes the ``unavailable`` reason)."""
        key = (sae, index)
        if key in self._cache:
            return self._cache[key]
        cfg = self.configs[sae]
        if sae not in self.saes:
            return Effects(unavailable=f"the server does not know where SAE {sae!r} is stored")
        try:
            reason = unavailable_reason(cfg, self.unembedding.hidden_size)
            if reason:
                out = Effects(unavailable=reason)
            else:
                row = self._decoder(sae)[index:index + 1]
                out = top_effects(self.unembedding.logits(row), self.k, self.decode)[0]
        except (OSError, ValueError, KeyError, RuntimeError, SAEFormatError) as e:
            out = Effects(unavailable=f"cannot read the weights: {e}")
        with self._lock:
            self._cache[key] = out
        return out


_SHARED: dict[tuple, LogitEffects] = {}
_SHARED_LOCK = threading.Lock()


def for_engine(model: str, engine, configs: Mapping[str, SAEConfig], tokenizer) -> LogitEffects:
    """The provider of a server: SAE directories from the engine's worker config
    (``sae_runtime.spec.payloads.WorkerConfig`` in ``vllm_config.additional_config``), the model
    directory from ``model`` (a Hugging Face id resolves to its local cache). One per
    (model, SAEs), created on first use."""
    from sae_runtime.step.config import worker_config

    wc = worker_config(getattr(getattr(engine, "vllm_config", None), "additional_config", None))
    saes = {e.id: (e.path, e.hook_name) for e in wc.saes} if wc is not None else {}
    key = (model, tuple(sorted((k, str(p), h) for k, (p, h) in saes.items())), id(tokenizer))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = LogitEffects(_local_dir(model), saes, configs,
                                        lambda t: tokenizer.decode([t]))
        return _SHARED[key]


def _local_dir(model: str) -> Path:
    p = Path(model)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # noqa: BLE001 - any failure: report the path as given
        return p


def _text_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SAEFormatError(f"{path}: cannot read the model config: {e}") from None
    text = cfg.get("text_config")
    if isinstance(text, dict):  # multimodal: the language model's settings
        return {"tie_word_embeddings": cfg.get("tie_word_embeddings"), **text,
                "model_type": text.get("model_type", cfg.get("model_type", ""))}
    return cfg


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise SAEFormatError(f"{index}: cannot read the weight map: {e}") from None
        return {name: model_dir / f for name, f in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SAEFormatError(f"{model_dir}: no *.safetensors files (logit effects read the "
                             f"final norm and unembedding from them)")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update((name, f) for name in h.keys())
    return out


def _has_suffix(where: Mapping[str, Path], suffix: str) -> bool:
    return any(n == suffix or n.endswith("." + suffix) for n in where)


def _find(where: Mapping[str, Path], suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        hits = sorted((n for n in where if n == suffix or n.endswith("." + suffix)), key=len)
        if hits:
            return hits[0]
    return None
