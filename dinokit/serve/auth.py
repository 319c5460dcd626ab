"""Who may bind where and who may write: loopback by default, a bearer token for everything else.

- A server on a non-loopback address without a token is refused at start (:func:`check_bind`).
- Writes (``POST /items``, ``DELETE /items/{id}``) need ``Authorization: Bearer <token>`` when the
  server has a token: 401 without one, 403 with a wrong one, compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

TOKEN_ENV = "DINOKIT_TOKEN"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class UnsafeBindError(ValueError):
    """A server would listen beyond this machine without a token."""


class AuthError(Exception):
    """A write without valid credentials; ``status`` is 401 (none given) or 403 (wrong)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public address


def read_token(token: str | None) -> str | None:
    """The token to require: ``token`` if given, else ``$DINOKIT_TOKEN`` (read now, at start), else None."""
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if token is not None and not token.strip():
        raise ValueError(f"the token is empty; pass --token T or set {TOKEN_ENV} to a non-empty secret")
    return token


def check_bind(host: str, token: str | None) -> None:
    """Refuse (UnsafeBindError, one line) to listen on a non-loopback ``host`` without a token."""
    if token is None and not is_loopback(host):
        raise UnsafeBindError(
            f"refusing to listen on {host} without a token: anyone who can reach it could add and delete "
            f"items; pass --token T (or set {TOKEN_ENV}) or use --host 127.0.0.1")


def check_write(authorization: str | None, token: str | None) -> None:
    """Raise AuthError unless ``authorization`` is ``Bearer <token>`` (always passes when token is None)."""
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AuthError(401, "this write needs an 'Authorization: Bearer <token>' header")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise AuthError(403, "wrong token")
