"""Bearer-token authentication shared by both doors (``authorization: Bearer <token>``, gRPC
metadata or HTTP header).

Tokens are compared in constant time; a refusal never says which part was wrong. A caller's
tenant is a digest of its token: with auth on, the prefix cache is salted by it (unless
``--no-cache-salt-per-token``), so one tenant cannot learn another's prompts from
``cached_tokens``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from sae_runtime.errors import SteeringError
from server.core.errors import PermissionDeniedError, UnauthenticatedError
from server.core.types import ANONYMOUS, Caller

ADMIN_METHODS = ("LoadVector", "UnloadVector")
"""Calls only admin tokens may make (``Auth.check_admin``); ordinary tokens are refused
there, and admin tokens are not ordinary tokens."""
MIXED_METHODS = ("TrainVector",)
"""Calls whose token depends on the request (``Auth.check_call``): ``TrainVector`` with
``register`` loads a vector, an admin call; without it, it only reads activations (what
``Encode`` reveals), an ordinary one. The doors let them through their token check and
the method checks."""


class AuthConfigError(SteeringError):
    """The tokens file cannot be used (a startup error: auth must never be off by mistake)."""


def load_tokens(path: Path | None) -> list[bytes]:
    """Tokens from ``path`` (one per line, # comments) and STEERD_AUTH_TOKENS (comma-separated).

    A file that cannot be read, or that holds no token, is an ``AuthConfigError``: a server
    told to check tokens never starts without any.
    """
    tokens: list[str] = []
    if path is not None:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise AuthConfigError(f"--auth-tokens-file {path}: cannot read it: {e}") from None
        from_file = [ln.strip() for ln in text.splitlines()
                     if ln.strip() and not ln.lstrip().startswith("#")]
        if not from_file:
            raise AuthConfigError(f"--auth-tokens-file {path}: holds no token (one per line; "
                                  "# starts a comment); refusing to start with auth off")
        tokens += from_file
    tokens += [t.strip() for t in os.environ.get("STEERD_AUTH_TOKENS", "").split(",") if t.strip()]
    return [t.encode() for t in tokens]


def load_admin_tokens(path: Path | None) -> list[bytes]:
    """Admin tokens from ``path`` (one per line, # comments; ``--admin-tokens-file``); none
    without a file: admin calls are then refused. A file with no token is an
    ``AuthConfigError``."""
    if path is None:
        return []
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise AuthConfigError(f"--admin-tokens-file {path}: cannot read it: {e}") from None
    tokens = [ln.strip() for ln in text.splitlines()
              if ln.strip() and not ln.lstrip().startswith("#")]
    if not tokens:
        raise AuthConfigError(f"--admin-tokens-file {path}: holds no token (one per line; # "
                              "starts a comment)")
    return [t.encode() for t in tokens]


def bearer_token(authorization: str) -> bytes | None:
    """The token of an ``authorization`` value ``Bearer <token>``; None for anything else."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


def bearer_ok(authorization: str, tokens: list[bytes]) -> bool:
    """Whether an ``authorization`` value (gRPC metadata or HTTP header) is ``Bearer <token>``
    with an accepted token. Both front ends call this one check."""
    given = bearer_token(authorization)
    if given is None:
        return False
    # compare against every token so timing does not reveal which one nearly matched
    return any([hmac.compare_digest(given, t) for t in tokens])


@dataclass(frozen=True)
class Auth:
    """The server's auth setting: accepted tokens (none: auth off) and whether callers'
    requests are salted by their token in the prefix cache."""

    tokens: tuple[bytes, ...] = ()
    salt_by_token: bool = True
    admin: tuple[bytes, ...] = ()  # --admin-tokens-file: the only tokens admin calls take

    @property
    def on(self) -> bool:
        return bool(self.tokens)

    def check_admin(self, authorization: str) -> None:
        """Raise unless ``authorization`` carries an admin token: PERMISSION_DENIED when the
        server has none (admin calls are off), UNAUTHENTICATED for a missing or wrong one.
        Both doors call this one check for every admin call (``ADMIN_METHODS``)."""
        if not self.admin:
            raise PermissionDeniedError("admin calls are off on this server (steerd serve "
                                        "--admin-tokens-file)")
        if not bearer_ok(authorization, list(self.admin)):
            raise UnauthenticatedError("admin calls need an admin bearer token (send "
                                       "'authorization: Bearer <admin token>')")

    def check_call(self, authorization: str, admin: bool) -> None:
        """``check_admin`` for an admin call, else the ordinary check (UNAUTHENTICATED): for
        ``MIXED_METHODS``, which the doors' own token checks let through."""
        if admin:
            self.check_admin(authorization)
        elif not self.ok(authorization):
            raise UnauthenticatedError("missing or invalid bearer token (send "
                                       "'authorization: Bearer <token>')")

    def ok(self, authorization: str) -> bool:
        return not self.tokens or bearer_ok(authorization, list(self.tokens))

    def caller(self, authorization: str) -> Caller:
        """The caller of an accepted request (its tenant when auth is on and salting)."""
        if not self.tokens or not self.salt_by_token:
            return ANONYMOUS
        token = bearer_token(authorization) or b""
        return Caller(tenant=hashlib.sha256(b"steerd-tenant:" + token).hexdigest()[:32])
