"""Position selectors: which positions an intervention edits or a read reports.

Defined once here and used by every layer: the server converter builds a ``Selector`` from
``steering.v1.PositionSelector`` and validates it (``validate``), the selector itself
travels to the worker inside the request payload (it is a ``msgspec.Struct``), and the
planner resolves it (``windows`` once per request; the token-id condition per step, through
``planner.TokenRule``, which holds the selector's ids as an array built once). The old
``Scope`` / ``ReadScope`` enums are sugar for selectors (``ALL``, ``GENERATION``, ``PROMPT``
below).

Alignment: the activation at position ``p`` is computed while the model consumes token
``p`` and shapes the prediction of token ``p + 1``. Prompt positions are
``0 .. prompt_len - 1``; generated token ``k`` (0-based) sits at ``prompt_len + k``.

A selector picks position ``p`` (consuming token ``t_p``) iff

    in_ranges(p)  != exclude_ranges       (no ranges: every position is in range)
    and in_tokens(t_p) != exclude_token_ids   (no token ids: every token matches)

``in_ranges(p)``: ``p`` lies in one of the half-open ranges ``[start, end)``, each counted
in its frame:

- ``ABSOLUTE``: absolute positions; ``start >= 0`` (default 0), ``end`` default: no end.
- ``PROMPT``: prompt positions; a negative value counts from the prompt's end (``-1`` = the
  last prompt position), ``start`` default 0, ``end`` default ``prompt_len``; clipped to
  ``[0, prompt_len)``, so a prompt range never reaches generated positions.
- ``GENERATION``: generation steps ``k >= 0`` (position ``prompt_len + k``); ``start``
  default 0, ``end`` default: no end. ``[0, 20)`` = the first 20 generated tokens (the
  activations consuming them), ``[4, None)`` = from the 5th on.

Ranges are resolved to absolute windows ``[lo, hi)`` (``POS_INF`` = no end) once the
prompt length is known; an excluded range set becomes its complement. Token ids are matched
per step against the token each position consumes.
"""

from __future__ import annotations

from enum import IntEnum

import msgspec

from sae_runtime.errors import InvalidRequestError
from sae_runtime.positions import POS_INF  # the end of a window without an end

MAX_RANGES = 8
"""Ranges one selector may list (each resolved window is one edit row: see ``max_windows``)."""
MAX_TOKEN_IDS = 64
"""Token ids one selector may list."""
MAX_POSITION = 2**40
"""Largest |start| / |end| accepted (far beyond any model length; keeps arithmetic exact)."""


class Frame(IntEnum):
    """What a range counts; numbers match ``steering.v1.PositionFrame``."""

    ABSOLUTE = 1
    PROMPT = 2
    GENERATION = 3


class Range(msgspec.Struct, array_like=True, frozen=True):
    """Half-open ``[start, end)`` in ``frame``; None = the frame's default (see module doc)."""

    frame: Frame
    start: int | None = None
    end: int | None = None

    def window(self, prompt_len: int) -> tuple[int, int]:
        """Absolute ``[lo, hi)`` (possibly empty, ``lo >= hi``)."""
        if self.frame == Frame.ABSOLUTE:
            return (self.start or 0), (POS_INF if self.end is None else self.end)
        if self.frame == Frame.GENERATION:
            lo = prompt_len + (self.start or 0)
            return lo, (POS_INF if self.end is None else prompt_len + self.end)

        def prompt_pos(v: int) -> int:
            return min(max(v + prompt_len if v < 0 else v, 0), prompt_len)

        lo = prompt_pos(self.start or 0)
        return lo, (prompt_len if self.end is None else prompt_pos(self.end))

    def validate(self, field: str) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if v is None:
                continue
            if abs(v) > MAX_POSITION:
                raise InvalidRequestError(f"{field}.{name}", f"{v} is out of range (|{name}| "
                                          f"<= {MAX_POSITION})")
            if v < 0 and self.frame != Frame.PROMPT:
                raise InvalidRequestError(
                    f"{field}.{name}", f"must be >= 0 in frame {self.frame.name} (only PROMPT "
                    f"ranges count from the end), got {v}")
        s, e = self.start or 0, self.end
        # Reversed or empty ranges are errors wherever the prompt length does not matter:
        # same sign in the PROMPT frame (both from the start or both from the end), always
        # in the other frames. [2, -3) depends on the prompt and may resolve to nothing.
        if e is not None and (s < 0) == (e < 0) and e <= s:
            raise InvalidRequestError(
                field, f"end ({e}) must be greater than start ({s}): the range is "
                f"{'reversed' if e < s else 'empty'}")


class Selector(msgspec.Struct, array_like=True, frozen=True):
    """A position selector (module docstring). The empty selector picks every position."""

    ranges: tuple[Range, ...] = ()
    exclude_ranges: bool = False
    token_ids: tuple[int, ...] = ()
    exclude_token_ids: bool = False

    # ------------------------------------------------------------------ server side

    def validate(self, field: str, vocab_size: int) -> None:
        """Raise InvalidRequestError naming the offending field (``field`` is the selector's)."""
        if len(self.ranges) > MAX_RANGES:
            raise InvalidRequestError(f"{field}.ranges", f"{len(self.ranges)} ranges given; at "
                                      f"most {MAX_RANGES} per selector")
        if self.exclude_ranges and not self.ranges:
            raise InvalidRequestError(f"{field}.exclude_ranges",
                                      "needs ranges to exclude (it would select no position)")
        if self.exclude_token_ids and not self.token_ids:
            raise InvalidRequestError(f"{field}.exclude_token_ids",
                                      "needs token_ids to exclude (without them every token "
                                      "matches)")
        for j, r in enumerate(self.ranges):
            r.validate(f"{field}.ranges[{j}]")
        if len(self.token_ids) > MAX_TOKEN_IDS:
            raise InvalidRequestError(f"{field}.token_ids", f"{len(self.token_ids)} token ids "
                                      f"given; at most {MAX_TOKEN_IDS} per selector")
        seen: set[int] = set()
        for j, t in enumerate(self.token_ids):
            if not 0 <= t < vocab_size:
                raise InvalidRequestError(f"{field}.token_ids[{j}]", f"token id {t} is out of "
                                          f"range (vocab_size={vocab_size})")
            if t in seen:
                raise InvalidRequestError(f"{field}.token_ids[{j}]", f"token id {t} is listed twice")
            seen.add(t)

    @property
    def max_windows(self) -> int:
        """Upper bound on ``len(windows(n))`` for any prompt length: the edit rows it costs."""
        if not self.ranges:
            return 1
        return len(self.ranges) + 1 if self.exclude_ranges else len(self.ranges)

    @property
    def by_token(self) -> bool:
        """Whether the selector depends on token ids (resolved per step)."""
        return bool(self.token_ids)

    @property
    def prompt_relative(self) -> bool:
        """Whether the positions depend on the prompt length (PROMPT or GENERATION ranges)."""
        return any(r.frame != Frame.ABSOLUTE for r in self.ranges)

    @property
    def may_select_prompt(self) -> bool:
        """False only when no prompt position can be selected (generation ranges only)."""
        return self.exclude_ranges or not self.ranges or any(
            r.frame != Frame.GENERATION for r in self.ranges)

    def canonical(self) -> list:
        """Order-free normal form (for the cache salt): equal selections give equal lists."""
        rng = sorted([int(r.frame), r.start or 0, POS_INF if r.end is None else r.end]
                     for r in self.ranges)
        return [rng, self.exclude_ranges, sorted(self.token_ids), self.exclude_token_ids]

    # ------------------------------------------------------------------ resolution

    def windows(self, prompt_len: int) -> tuple[tuple[int, int], ...]:
        """The absolute windows ``[lo, hi)`` the ranges select: sorted, disjoint, non-empty
        (before the token-id condition). ``()`` selects nothing."""
        if not self.ranges:
            return ((0, POS_INF),)
        merged: list[list[int]] = []
        for lo, hi in sorted(r.window(prompt_len) for r in self.ranges):
            if hi <= lo:
                continue
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        if not self.exclude_ranges:
            return tuple((lo, hi) for lo, hi in merged)
        out, at = [], 0
        for lo, hi in merged:
            if lo > at:
                out.append((at, lo))
            at = hi
        if at < POS_INF:
            out.append((at, POS_INF))
        return tuple(out)

    def covers(self, position: int, prompt_len: int, token_id: int | None = None) -> bool:
        """Whether ``position`` (consuming ``token_id``) is selected: the per-position oracle.

        A token-id selector needs ``token_id``.
        """
        in_range = any(lo <= position < hi for lo, hi in self.windows(prompt_len))
        if not in_range or not self.token_ids:
            return in_range
        if token_id is None:
            raise ValueError("a token-id selector needs the position's token id")
        return (token_id in self.token_ids) != self.exclude_token_ids


ALL = Selector()
"""Every position (``Scope.ALL``, ``ReadScope.ALL``)."""
GENERATION = Selector((Range(Frame.GENERATION),))
"""Positions >= prompt_len (``Scope.GENERATION_ONLY``, ``ReadScope.GENERATION``)."""
PROMPT = Selector((Range(Frame.PROMPT),))
"""Positions < prompt_len (``ReadScope.PROMPT``)."""
