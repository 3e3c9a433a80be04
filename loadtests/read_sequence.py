"""The exactly-once check of one stream's feature reads (pure: no Locust, no network).

The Locust reading task (loadtests/locustfile.py ``check_reads``) runs it on every
finished stream; each message it returns starts with ``read sequence:``, which is how
loadtests/soak.py counts read-sequence violations apart from other failures.
"""

from __future__ import annotations

from collections.abc import Sequence

from steering.v1 import steering_pb2 as pb

PREFIX = "read sequence: "


def read_sequence_errors(reads: Sequence[tuple[str, int | None]], prompt: Sequence[int],
                         generated: Sequence[int],
                         features: Sequence[tuple[str, int, int]]) -> list[str]:
    """What is wrong with one finished stream's reads, in stream order ([] when nothing).

    ``reads``: (SAE id, scope) per requested read, scope None for a read with a position
    selector (then only duplicates, order, token ids and the fed range are checked).
    ``features``: (SAE id, position, token id) per FeatureActivations as they arrived.
    The rule (docs/api.md, "Feature reads"): position p is reported once token p has been fed,
    and the last generated token never is, so the fed positions are 0 .. prompt + generated
    - 2 (the whole prompt when nothing was generated); a scoped read covers all of them (ALL), those < len(prompt) (PROMPT) or those
    >= len(prompt) (GENERATION), each exactly once, in increasing order, carrying the token
    it consumes (prompt ids, then generated ids). Across reads, positions never go back.
    """
    msg = PREFIX
    full = list(prompt) + list(generated)
    n_prompt, n_fed = len(prompt), len(prompt) + max(len(generated) - 1, 0)
    scopes = dict(reads)
    errors: list[str] = []
    seen: dict[str, list[int]] = {sae: [] for sae, _ in reads}
    last = -1  # highest position so far, over all reads
    for sae, pos, tok in features:
        if sae not in scopes:
            errors.append(f"{msg}features of SAE {sae!r}, which was not read")
            continue
        got = seen[sae]
        if pos in got:
            errors.append(f"{msg}{sae} position {pos} twice")
        elif got and pos < got[-1]:
            errors.append(f"{msg}{sae} position {pos} after position {got[-1]} (out of order)")
        elif pos < last:
            errors.append(f"{msg}{sae} position {pos} after position {last} of another read "
                          "(out of order)")
        if pos >= n_fed:
            errors.append(f"{msg}{sae} position {pos} was never fed (prompt {n_prompt} + "
                          f"generated {len(generated)}: last fed position {n_fed - 1})")
        elif tok != full[pos]:
            errors.append(f"{msg}{sae} position {pos} carries token {tok}, the stream's token "
                          f"there is {full[pos]}")
        got.append(pos)
        last = max(last, pos)
    for sae, scope in reads:
        if scope is None:
            continue
        lo = n_prompt if scope == pb.READ_SCOPE_GENERATION else 0
        hi = min(n_prompt, n_fed) if scope == pb.READ_SCOPE_PROMPT else n_fed
        have = set(seen[sae])
        missing = [p for p in range(lo, hi) if p not in have]
        if missing:
            errors.append(f"{msg}{sae} position {missing[0]} missing ({len(missing)} of "
                          f"{lo}..{hi - 1} missing)")
        outside = sorted(p for p in have if not lo <= p < hi and p < n_fed)
        if outside:
            errors.append(f"{msg}{sae} position {outside[0]} is outside the read's "
                          f"{pb.ReadScope.Name(scope)} ({lo}..{hi - 1})")
    return errors
