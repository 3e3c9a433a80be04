"""Automatic feature labels: statistics of every feature over a labelled corpus.

Each token of the labelling corpus knows the topic of its sentence (``corpus.document``), so
a feature's *topic* is measured, not guessed: the topic with the highest mean activation per
token, its *selectivity* (that topic's share of the per-topic means) and *coverage* (the
fraction of that topic's tokens on which the feature fires). A feature whose selectivity is
at least ``TOPICAL`` gets the label ``"<topic>: <top tokens>"``; others ``"mixed: <top
tokens>"``. Top tokens are the ones with the highest mean activation per occurrence. ``score = selectivity * coverage`` ranks a topic's broad features (they
fire across the whole topic) above word-specific ones; search uses it to order matches.

Output is ``feature_labels.json`` (schema in ``sae_runtime.labels.store``) beside the SAE.
"""

from __future__ import annotations

import heapq
import json
from collections import defaultdict
from pathlib import Path

import torch

from sae_runtime.training.corpus import GENERAL, TOPICS

TOPICAL = 0.5
N_EXAMPLES = 5
N_TOP_TOKENS = 5
MIN_TOKEN_COUNT = 5
CONTEXT = 8  # tokens of left context shown with an example
CATEGORIES = [*TOPICS, GENERAL]


def tokenize_labelled(docs: list[tuple[str, list[str]]], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(token ids with BOS, category index per token; -1 for BOS) for each document.

    Sentences are tokenized one at a time (with the joining space), which gives the same ids
    as tokenizing the document whole: the byte-level pre-tokenizer splits at spaces.
    """
    bos = tokenizer.bos_token_id
    out = []
    for text, topics in docs:
        sents = _split(text, len(topics))
        ids, cats = [bos], [-1]
        for i, (sent, topic) in enumerate(zip(sents, topics, strict=True)):
            piece = tokenizer((" " if i else "") + sent, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            cats.extend([CATEGORIES.index(topic)] * len(piece))
        out.append((ids, cats))
    return out


def _split(text: str, n: int) -> list[str]:
    # corpus sentences end with "." and are joined by single spaces; no "." inside one
    parts = [p.strip() + "." for p in text.split(".") if p.strip()]
    if len(parts) != n:
        raise ValueError(f"expected {n} sentences, found {len(parts)} in {text!r}")
    return parts


def activations(model, data: list[tuple[list[int], list[int]]], layer: int, batch: int = 64):
    """``(doc index, (ids, cats), [len(ids), d] activations)`` for each tokenized document."""
    for start in range(0, len(data), batch):
        chunk = data[start:start + batch]
        hs = site_activations(model, [ids for ids, _ in chunk], layer)
        for j, (item, h) in enumerate(zip(chunk, hs, strict=True)):
            yield start + j, item, h


def pad_batch(batch_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of sequences right-padded with 0 to the longest."""
    width = max(len(x) for x in batch_ids)
    inp = torch.zeros(len(batch_ids), width, dtype=torch.int64)
    mask = torch.zeros_like(inp)
    for r, ids in enumerate(batch_ids):
        inp[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
    return inp, mask


@torch.no_grad()
def site_activations(model, batch_ids: list[list[int]], layer: int) -> list[torch.Tensor]:
    """Residual stream after decoder layer ``layer`` (``blocks.{layer}.hook_resid_post``)."""
    inp, mask = pad_batch(batch_ids)
    hs = model(input_ids=inp, attention_mask=mask, output_hidden_states=True).hidden_states
    h = hs[layer + 1].float()  # hidden_states[0] is the embedding output
    return [h[r, : len(ids)] for r, ids in enumerate(batch_ids)]


@torch.no_grad()
def label_features(model, tokenizer, encode_fn, docs: list[tuple[str, list[str]]], layer: int,
                   d_sae: int, sae_name: str) -> dict:
    """Statistics and a label for every feature that fires on ``docs``.

    ``encode_fn(x [N, d_in]) -> (values [N, k], indices [N, k])`` gives the sparse codes.
    """
    data = tokenize_labelled(docs, tokenizer)
    n_cat = len(CATEGORIES)
    fires = torch.zeros(d_sae)
    act_sum = torch.zeros(d_sae)
    act_max = torch.zeros(d_sae)
    cat_sum = torch.zeros(n_cat, d_sae)
    cat_fires = torch.zeros(n_cat, d_sae)
    cat_tokens = torch.zeros(n_cat)
    tok_sum: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    examples: dict[int, list] = defaultdict(list)  # min-heaps of (act, doc, pos)
    tok_total: dict[int, int] = defaultdict(int)  # occurrences of each token
    n_tokens = 0
    norm_sum = 0.0
    for doc, (ids, cats), h in activations(model, data, layer):
        cats_t = torch.tensor(cats)
        keep = cats_t >= 0  # not BOS
        for t in ids[1:]:
            tok_total[t] += 1
        vals, idx = encode_fn(h[keep])
        norm_sum += float(h[keep].norm(dim=-1).sum())
        cat = cats_t[keep]
        n_tokens += int(keep.sum())
        cat_tokens += torch.bincount(cat, minlength=n_cat).float()
        on = vals > 0
        flat_idx, flat_val = idx[on], vals[on]
        flat_cat = cat[:, None].expand_as(idx)[on]
        flat_pos = torch.nonzero(on)[:, 0] + 1  # +1: position in ids (BOS skipped)
        fires.index_add_(0, flat_idx, torch.ones_like(flat_val))
        act_sum.index_add_(0, flat_idx, flat_val)
        act_max.scatter_reduce_(0, flat_idx, flat_val, reduce="amax")
        cat_sum.index_put_((flat_cat, flat_idx), flat_val, accumulate=True)
        cat_fires.index_put_((flat_cat, flat_idx), torch.ones_like(flat_val), accumulate=True)
        for f, v, p in zip(flat_idx.tolist(), flat_val.tolist(), flat_pos.tolist(), strict=True):
            t = ids[p]
            tok_sum[f][t] += v
            heap = examples[f]
            item = (v, doc, p)
            if len(heap) < N_EXAMPLES:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    cat_mean = cat_sum / cat_tokens.clamp(min=1)[:, None]  # [C, d_sae]
    features = []
    for f in range(d_sae):
        if fires[f] == 0:
            continue
        share = cat_mean[:, f] / cat_mean[:, f].sum()
        c = int(share.argmax())
        selectivity = float(share[c])
        coverage = float(cat_fires[c, f] / cat_tokens[c].clamp(min=1))
        top_tokens = _top_tokens(tok_sum[f], tok_total, tokenizer)
        topic = CATEGORIES[c]
        if selectivity >= TOPICAL:
            label = f"{topic}: {', '.join(top_tokens[:4])}"
        else:
            label = f"mixed: {', '.join(top_tokens[:4])}"
        ex = []
        for v, doc, p in sorted(examples[f], reverse=True):
            ids = data[doc][0]
            ex.append({
                "context": tokenizer.decode(ids[max(1, p - CONTEXT):p]),
                "token": tokenizer.decode([ids[p]]),
                "activation": round(v, 4),
            })
        features.append({
            "index": f,
            "label": label,
            "density": round(float(fires[f]) / n_tokens, 6),
            "max_activation": round(float(act_max[f]), 4),
            "mean_activation": round(float(act_sum[f] / fires[f]), 4),
            "topic": topic,
            "topic_selectivity": round(selectivity, 4),
            "topic_coverage": round(coverage, 4),
            "score": round(selectivity * coverage, 4),
            "topic_means": {CATEGORIES[i]: round(float(cat_mean[i, f]), 4) for i in range(n_cat)},
            "top_tokens": top_tokens,
            "examples": ex,
        })
    return {
        "format": "steerd.feature_labels/1",
        "sae": sae_name,
        "d_sae": d_sae,
        "labelling_tokens": n_tokens,
        "site_norm": round(norm_sum / max(n_tokens, 1), 4),
        "method": ("per-feature statistics over a topic-labelled synthetic corpus "
                   "(sae_runtime/training/labels.py)"),
        "dead_features": [f for f in range(d_sae) if fires[f] == 0],
        "features": features,
    }


def _top_tokens(mass: dict[int, float], total: dict[int, int], tokenizer) -> list[str]:
    """Tokens ranked by mean activation over all their occurrences (zeros included).

    Ranking by total mass would list "the" and "." for every feature that fires broadly;
    the mean per occurrence favours the tokens the feature is specific to. Tokens seen
    fewer than ``MIN_TOKEN_COUNT`` times are left out (one lucky occurrence is not a pattern).
    """
    ranked = sorted(((m / total[t], t) for t, m in mass.items() if total[t] >= MIN_TOKEN_COUNT),
                    reverse=True)
    out: list[str] = []
    for _, t in ranked:
        text = tokenizer.decode([t]).strip() or repr(tokenizer.decode([t]))
        if text not in out:
            out.append(text)
        if len(out) == N_TOP_TOKENS:
            break
    return out


def write(labels: dict, sae_dir: Path) -> Path:
    path = sae_dir / "feature_labels.json"
    path.write_text(json.dumps(labels, separators=(",", ":")))
    return path
