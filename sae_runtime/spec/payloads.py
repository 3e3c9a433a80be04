"""One request's edits and reads as they travel server -> worker (``msgspec.Struct``).

``RequestPayload`` rides in ``SamplingParams.extra_args[EXTRA_ARGS_KEY]`` as msgpack bytes
(``encode_request`` / ``decode_request``; vLLM serialises ``extra_args`` itself, and bytes
are msgpack-able). SAEs are named by their *index* in the server's SAE list (== the worker's
hook id). The other two cross-process records are the worker's start-up config
(``sae_runtime.step.config``) and its reads (``sae_runtime.step.records``).
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from sae_runtime.spec.selectors import Selector

EXTRA_ARGS_KEY = "sae_steering"  # key in SamplingParams.extra_args


# --------------------------------------------------------------------------- request


class CondPayload(msgspec.Struct, array_like=True, frozen=True):
    """An edit's condition: feature of the edit's SAE, ``edits.Cond``, threshold, latch."""

    feature: int
    op: int
    threshold: float
    latch: bool = False


class EditPayload(msgspec.Struct, array_like=True, frozen=True):
    """One intervention: ``sae`` index, feature, ``ops.Mode``, value, position selector,
    and an optional condition.

    The worker turns it into edit rows (``sae_runtime.step.edits``), one per window of the
    selector, once it knows the request's prompt length (``planner.compile_request``)."""

    sae: int
    feature: int
    mode: int
    value: float
    positions: Selector = Selector()
    when: CondPayload | None = None
    vector: bytes | None = None  # an inline vector (float32 [d_model]) on a vector bank:
    # the ADD edit adds value * vector instead of value * W_dec[feature]


class ReadPayload(msgspec.Struct, array_like=True, frozen=True):
    """One read: ``sae`` index, top-k, watched features, position selector."""

    sae: int
    top_k: int
    watch: tuple[int, ...]
    positions: Selector = Selector()


class ActPayload(msgspec.Struct, array_like=True, frozen=True):
    """One raw activation read: the worker site's index (``WorkerConfig.act_sites``, then its
    before-edits twins: ``spec.activations.DeclaredSites.site_id``) and
    the positions (the worker copies the rows of the hull of its windows; the server keeps
    the selected ones and pools)."""

    site: int
    positions: Selector = Selector()


class RequestPayload(msgspec.Struct, frozen=True, omit_defaults=True):
    """Everything the worker needs about one request."""

    rid: str = ""  # the server's request id (vLLM rewrites its own): reads are keyed by it
    edits: tuple[EditPayload, ...] = ()
    reads: tuple[ReadPayload, ...] = ()
    pooled: bool = False  # the reads want per-sequence sums and maxima (Encode)
    acts: tuple[ActPayload, ...] = ()  # raw activation reads


_REQ_ENC = msgspec.msgpack.Encoder()
_REQ_DEC = msgspec.msgpack.Decoder(RequestPayload)


def encode_request(payload: RequestPayload) -> bytes:
    return _REQ_ENC.encode(payload)


def decode_request(extra_args: Mapping | None) -> RequestPayload | None:
    """The payload in a request's ``extra_args`` (None for a plain request)."""
    raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
    return None if raw is None else _REQ_DEC.decode(raw)
