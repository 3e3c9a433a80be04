"""Output-side labels: measure how well a topic feature steers, and at what clamp value.

Activation statistics say what a feature *reads*; this pass measures what clamping it
*does*. For each topic, its ``CANDIDATES`` best features by activation score are clamped
(at every position, as ``steerd`` clamps: ``x += (v - f_i(x)) * W_dec[i]``) to each value in
``MULTIPLES * site_norm`` while the model continues ``N_PROMPTS`` neutral openers
drawn from the corpus's general sentences. A continuation counts as on topic when it
holds at least ``MIN_DISTINCT`` distinct words of that topic's vocabulary
(``corpus.topic_words``) and more than of any other topic's. Rates average greedy and sampled continuations. Each candidate's values
are rated by the mean rate of the value and its neighbouring multiples (a value at the edge
of the working range fails on other prompts); the best is ``steer_value`` and its rating
``steer_success``. Search
ranks features that steer above ones that do not.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter

import torch

from sae_runtime.training import corpus, sae_train

log = logging.getLogger(__name__)

CANDIDATES = 4
MULTIPLES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)
N_PROMPTS = 32
NEW_TOKENS = 32
MIN_DISTINCT = 3
_WORD = re.compile(r"[a-z]+")


def neutral_prompts(seed: int, n: int = N_PROMPTS) -> list[str]:
    """The first three words of general-talk sentences (openers with no topic)."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        words = corpus.sentence(corpus.GENERAL, rng).split()[:3]
        prompt = " ".join(words).rstrip(",.")
        if prompt not in out:
            out.append(prompt)
    return out


def topic_of(text: str, vocab: dict[str, set[str]]) -> str | None:
    """The topic with the most *distinct* topic words (at least ``MIN_DISTINCT``), or None.

    Counting distinct words rejects degenerate repetition ("dove dove dove ..."): an
    over-strong clamp that collapses the model onto one word is not steering.
    """
    words = set(_WORD.findall(text.lower()))
    hits = Counter({t: len(words & v) for t, v in vocab.items()})
    (best, n), *rest = hits.most_common()
    return best if n >= MIN_DISTINCT and (not rest or rest[0][1] < n) else None


@torch.no_grad()
def calibrate(model, tokenizer, params: dict[str, torch.Tensor], k: int, layer: int,
              features: list[dict], site_norm: float, seed: int, *, candidates: int = CANDIDATES,
              multiples: tuple[float, ...] = MULTIPLES, n_prompts: int = N_PROMPTS,
              new_tokens: int = NEW_TOKENS) -> None:
    """Add ``steer_value`` and ``steer_success`` to the best candidates of each topic, in place."""
    vocab = {t: corpus.topic_words(t) for t in corpus.TOPICS}
    prompts = neutral_prompts(seed, n_prompts)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    clamp: dict = {}

    def hook(_mod, _args, output):
        if not clamp:
            return output
        h = output[0] if isinstance(output, tuple) else output
        _, vals, idx = sae_train.encode(params, h, k)
        act = (vals * (idx == clamp["f"])).sum(-1)  # 0 where the feature is not in the top k
        new = h + (clamp["v"] - act)[..., None] * params["W_dec"][clamp["f"]]
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        for topic in corpus.TOPICS:
            cands = sorted((f for f in features if f["topic"] == topic and f["label"].startswith(topic)),
                           key=lambda f: -f["score"])
            for f in cands[:candidates]:
                rates = []
                for m in multiples:
                    clamp.update(f=f["index"], v=m * site_norm)
                    rate = 0.0
                    for sample in (False, True):  # greedy and sampled continuations
                        torch.manual_seed(seed)
                        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=sample,
                                             pad_token_id=tokenizer.pad_token_id)
                        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                       skip_special_tokens=True)
                        rate += sum(topic_of(t, vocab) == topic for t in texts) / len(texts) / 2
                    rates.append(rate)
                # A value at the edge of the working range fails on other prompts: rate each
                # value by the mean of it and its neighbouring multiples, keep the best.
                smooth = [sum(rates[max(0, i - 1):i + 2]) / len(rates[max(0, i - 1):i + 2])
                          for i in range(len(rates))]
                i = max(range(len(rates)), key=lambda j: (smooth[j], -j))
                f["steer_success"] = round(smooth[i], 4)
                f["steer_value"] = round(multiples[i] * site_norm, 4) if rates[i] > 0 else 0.0
                log.info("steer %s feature %d: rates %s -> %.1f", topic, f["index"],
                         [round(r, 2) for r in rates], f["steer_value"])
                clamp.clear()
    finally:
        handle.remove()
        clamp.clear()
