"""Feature labels beside an SAE (``feature_labels.json``): loading, lookup and search.

Schema (``"format": "steerd.feature_labels/1"``)::

    {"format": "steerd.feature_labels/1", "d_sae": 1024,
     "dead_features": [3, 17],                   # optional
     "site_norm": 189.7,                         # optional: mean L2 norm of the SAE's input
     "features": [{"index": 0, "label": "ocean: whale, reef", # required
                   "density": 0.02, "max_activation": 4.1,     # optional from here on
                   "mean_activation": 1.3, "topic": "ocean", "topic_selectivity": 0.9,
                   "topic_coverage": 0.6, "score": 0.54,
                   "steer_value": 190.0, "steer_success": 0.9,
                   "top_tokens": ["whale"], "examples": [{"context": "...", "token": " whale",
                                                          "activation": 4.1, "after": "..."}],
                   "promoted": [{"token": " sea", "token_id": 412, "logit": 2.3}],
                   "suppressed": [{"token": " oven", "token_id": 97, "logit": -1.9}]}]}

Only ``index`` and ``label`` are required, so labels from elsewhere (e.g. Neuronpedia
explanations, ``steerd labels import-neuronpedia``) can be converted in a few lines.
``score`` orders a search's matches (higher is a better exemplar of its label);
``sae_runtime.training.labels`` writes every field but ``promoted``/``suppressed``;
``sae_runtime.labels.build`` (``steerd labels build``) writes the statistics below.

Fields, as the labellers define them (every activation is ``sae_runtime.ops.encode`` of the
SAE's input at its site; a feature *fires* on a token where its activation is non-zero):

- ``density``: fraction of labelling tokens on which the feature fires;
- ``max_activation``: largest activation seen; ``mean_activation``: mean over the tokens
  where it fires (not over all tokens);
- ``top_tokens``: tokens, decoded, ranked by the activation mass on them (``build``: the sum
  of the feature's activations over every occurrence of the token; the default labeller:
  the mean per occurrence);
- ``examples``: top-activating tokens, strongest first, at distinct positions: ``context``
  is the text just before the token, ``token`` the token, ``after`` (optional) the text
  just after it;
- ``promoted`` / ``suppressed``: the feature's *logit effects* (``sae_runtime.labels.logit_effects``):
  the tokens whose logits its decoder direction raises / lowers most through the model's
  final norm gain and unembedding, ``logit`` the change per unit activation, largest
  magnitude first. Empty where the SAE's site does not write the residual stream; the
  server then computes them itself from the model's weights when asked (``GetFeature``);
- ``site_norm`` (file level): mean L2 norm of the SAE's input over the labelling tokens.

Fields a file has that are not listed here (e.g. ``label_source``, ``build``) are kept by
the tools that rewrite the file and ignored when loading.

Search is keyword search: the query is split into words, and a feature matches when each
word occurs (case-insensitive) in its label, topic or top tokens. Matches rank by how many
query words match as whole words of the label or topic, then by ``steer_success`` (features
measured to steer toward their label first), then ``score``, then ``density``; ties keep
(sae, index) order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sae_runtime.errors import SAEFormatError

LABELS_FILE = "feature_labels.json"
FORMAT = "steerd.feature_labels/1"
_WORD = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class Example:
    context: str
    token: str
    activation: float
    after: str = ""
    """Text just after the token (empty when the labeller did not record it)."""


@dataclass(frozen=True)
class TokenLogit:
    """One token of a feature's logit effects: the change of its logit per unit activation."""

    token: str
    token_id: int
    logit: float


@dataclass(frozen=True)
class Feature:
    sae: str
    index: int
    label: str
    density: float = 0.0
    max_activation: float = 0.0
    mean_activation: float = 0.0
    topic: str = ""
    topic_selectivity: float = 0.0
    topic_coverage: float = 0.0
    score: float = 0.0
    top_tokens: tuple[str, ...] = ()
    examples: tuple[Example, ...] = ()
    topic_means: Mapping[str, float] = field(default_factory=dict)
    dead: bool = False
    steer_value: float = 0.0
    """Clamp value measured to steer generations toward the label (0: not measured)."""
    steer_success: float = 0.0
    """Fraction of the labeller's neutral prompts that clamping to ``steer_value`` moved to
    the feature's topic."""
    site_norm: float = 0.0
    """Mean L2 norm of the SAE's input at its site while labelling (the same for every
    feature of an SAE): the scale of the stream, so a guide for clamp values."""
    promoted: tuple[TokenLogit, ...] = ()
    """Tokens the decoder direction promotes most, largest logit first (logit effects)."""
    suppressed: tuple[TokenLogit, ...] = ()
    """Tokens it suppresses most, most negative first."""
    logit_effects_unavailable: str = ""
    """Why ``promoted``/``suppressed`` are empty (empty when they are filled or not asked)."""

    def as_dict(self) -> dict:
        return {
            "sae": self.sae, "index": self.index, "label": self.label, "density": self.density,
            "max_activation": self.max_activation, "mean_activation": self.mean_activation,
            "topic": self.topic, "topic_selectivity": self.topic_selectivity,
            "topic_coverage": self.topic_coverage, "score": self.score,
            "top_tokens": list(self.top_tokens), "dead": self.dead,
            "topic_means": dict(self.topic_means), "site_norm": self.site_norm,
            "steer_value": self.steer_value, "steer_success": self.steer_success,
            "examples": [{"context": e.context, "token": e.token, "activation": e.activation,
                          "after": e.after} for e in self.examples],
            "promoted": [_token_logit_dict(t) for t in self.promoted],
            "suppressed": [_token_logit_dict(t) for t in self.suppressed],
            "logit_effects_unavailable": self.logit_effects_unavailable,
        }


def _token_logit_dict(t: TokenLogit) -> dict:
    return {"token": t.token, "token_id": t.token_id, "logit": t.logit}


class FeatureLabels:
    """The labelled features of one SAE."""

    def __init__(self, sae: str, d_sae: int, features: Iterable[Feature], dead: Iterable[int] = (),
                 site_norm: float = 0.0):
        self.sae = sae
        self.d_sae = d_sae
        self.site_norm = site_norm
        self.features = {f.index: replace(f, site_norm=site_norm) for f in features}
        self.dead = frozenset(dead)
        # lower-cased text searched for substrings, and the whole words of label + topic
        self._text = {i: " ".join([f.label, f.topic, *f.top_tokens]).lower()
                      for i, f in self.features.items()}
        self._words = {i: set(_WORD.findall(f"{f.label} {f.topic}".lower()))
                       for i, f in self.features.items()}

    @classmethod
    def load(cls, path: Path, sae: str, d_sae: int) -> FeatureLabels:
        """Read and check ``path``; errors name the file and the offending entry."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SAEFormatError(f"{path}: cannot read feature labels: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise SAEFormatError(f"{path}: not a feature-label file (expected \"format\": \"{FORMAT}\")")
        if raw.get("d_sae", d_sae) != d_sae:
            raise SAEFormatError(f"{path}: labels are for d_sae={raw['d_sae']} but the SAE has {d_sae}")
        feats = []
        for n, rec in enumerate(raw.get("features", [])):
            try:
                feats.append(_feature(sae, rec, d_sae))
            except (KeyError, TypeError, ValueError) as e:
                raise SAEFormatError(f"{path}: features[{n}]: {e}") from None
        try:
            site_norm = float(raw.get("site_norm", 0.0))
        except (TypeError, ValueError):
            raise SAEFormatError(f"{path}: site_norm must be a number") from None
        return cls(sae, d_sae, feats, raw.get("dead_features", ()), site_norm)

    def get(self, index: int) -> Feature:
        """The record of ``index``; an unlabelled index (e.g. dead) gets an empty record."""
        if index in self.features:
            return self.features[index]
        dead = index in self.dead
        label = "dead: never fired on the labelling corpus" if dead else "(no label)"
        return Feature(self.sae, index, label, dead=dead, site_norm=self.site_norm)

    def matches(self, words: list[str]) -> list[tuple[int, Feature]]:
        """Features matching every word, each with its count of whole-word matches."""
        out = []
        for i, f in self.features.items():
            text = self._text[i]
            if all(w in text for w in words):
                out.append((sum(w in self._words[i] for w in words), f))
        return out


def query_words(query: str) -> list[str]:
    return [w for w in query.lower().split() if w]


def search(labels: Mapping[str, FeatureLabels], query: str, limit: int) -> list[Feature]:
    """Best match first across every SAE in ``labels`` (see the module docstring)."""
    words = query_words(query)
    found = [m for lab in labels.values() for m in lab.matches(words)]
    order = {sid: n for n, sid in enumerate(labels)}
    found.sort(key=lambda m: (-m[0], -m[1].steer_success, -m[1].score, -m[1].density,
                              order[m[1].sae], m[1].index))
    return [f for _, f in found[:limit]]


def load_beside(sae_dir: Path, sae: str, d_sae: int) -> FeatureLabels | None:
    """The labels in ``sae_dir/feature_labels.json``, or None when there is no such file."""
    path = Path(sae_dir) / LABELS_FILE
    if not path.is_file():
        return None
    return FeatureLabels.load(path, sae, d_sae)


def _feature(sae: str, rec: Mapping, d_sae: int) -> Feature:
    index = rec["index"]
    if not isinstance(index, int) or not 0 <= index < d_sae:
        raise ValueError(f"index {index!r} is not an integer in [0, {d_sae})")
    label = rec["label"]
    if not isinstance(label, str):
        raise TypeError(f"label of feature {index} must be a string")
    num = {k: float(rec.get(k, 0.0)) for k in (
        "density", "max_activation", "mean_activation", "topic_selectivity", "topic_coverage", "score",
        "steer_value", "steer_success")}
    return Feature(
        sae=sae, index=index, label=label, topic=str(rec.get("topic", "")),
        top_tokens=tuple(str(t) for t in rec.get("top_tokens", ())),
        examples=tuple(Example(str(e["context"]), str(e["token"]), float(e["activation"]),
                               str(e.get("after", ""))) for e in rec.get("examples", ())),
        promoted=_token_logits(rec, "promoted", index),
        suppressed=_token_logits(rec, "suppressed", index),
        topic_means={str(k): float(v) for k, v in rec.get("topic_means", {}).items()},
        **num,
    )


def _token_logits(rec: Mapping, key: str, index: int) -> tuple[TokenLogit, ...]:
    out = []
    for n, t in enumerate(rec.get(key, ())):
        try:
            out.append(TokenLogit(str(t["token"]), int(t["token_id"]), float(t["logit"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"feature {index}: {key}[{n}] needs token, token_id and logit ({e})") from None
    return tuple(out)
