"""Signed tester overrides and signed pins: HMAC-SHA256 tokens that nobody can forge without the secret.

An override token puts its holder on one variant of one rollout until it expires::

    token = create_token(secret, rollout="checkout-v2", variant="new", ttl=7 * 86400)

Format (version 1): ``base64url(payload) + "." + base64url(HMAC-SHA256(secret, payload))`` with
``payload = "v1|override|<rollout>|<variant>|<expires, POSIX seconds>"``. Verification compares the
signature in constant time and checks the expiry against the router's clock; anything malformed,
forged, expired or for another rollout is rejected (and counted by the caller), never raised.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Literal

__all__ = [
    "SECRET_ENV",
    "OverrideToken",
    "create_token",
    "resolve_secret",
    "sign_value",
    "verify_token",
    "verify_value",
]

SECRET_ENV = "CANARY_ROUTER_SECRET"  # noqa: S105  # the variable's name, not a secret
"""The environment variable read when no secret is passed explicitly."""

MAX_TOKEN_LENGTH = 512
_MIN_SECRET = 16

Variant = Literal["old", "new"]


def resolve_secret(secret: str | bytes | None) -> bytes | None:
    """Return the signing key: ``secret`` if given, else ``$CANARY_ROUTER_SECRET``, else ``None``.

    Raises :class:`ValueError` for a secret shorter than 16 bytes (too easy to guess).
    """
    value: str | bytes | None = secret if secret is not None else os.environ.get(SECRET_ENV)
    if value is None or value == "":
        return None
    key = value.encode() if isinstance(value, str) else bytes(value)
    if len(key) < _MIN_SECRET:
        raise ValueError(f"the signing secret must be at least {_MIN_SECRET} bytes long")
    return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64_TEXT = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(text: str) -> bytes:
    """Decode unpadded base64url strictly: one canonical text per byte string, so a token cannot be varied."""
    if not _B64_TEXT.fullmatch(text):  # the lenient decoder would silently drop other characters
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:  # non-zero unused bits in the last character
        raise ValueError("not canonical base64url")
    return data


def _sign(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


class OverrideToken:
    """A verified override: which rollout, which variant, until when."""

    __slots__ = ("expires", "rollout", "variant")

    def __init__(self, rollout: str, variant: Variant, expires: float) -> None:
        self.rollout = rollout
        self.variant: Variant = variant
        self.expires = expires

    def __repr__(self) -> str:
        return f"OverrideToken({self.rollout!r}, {self.variant!r}, expires={self.expires:.0f})"


def create_token(
    secret: str | bytes | None,
    *,
    rollout: str,
    variant: Variant,
    ttl: float,
    now: float | None = None,
) -> str:
    """Create a signed override token for ``rollout`` → ``variant``, valid for ``ttl`` seconds."""
    key = resolve_secret(secret)
    if key is None:
        raise ValueError(f"no signing secret: pass one or set ${SECRET_ENV}")
    if variant not in ("old", "new"):
        raise ValueError(f"variant must be 'old' or 'new', got {variant!r}")
    if not rollout or "|" in rollout:
        raise ValueError(f"invalid rollout name {rollout!r}")
    if not (ttl > 0 and math.isfinite(ttl)):  # NaN and infinity would fail later with a less clear error
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    expires = int((time.time() if now is None else now) + ttl)
    payload = f"v1|override|{rollout}|{variant}|{expires}".encode()
    return f"{_b64(payload)}.{_b64(_sign(key, payload))}"


def _verified_payload(key: bytes, token: str) -> list[str] | None:
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        return None
    body, signature = token.split(".")
    try:
        payload = _unb64(body)
        given = _unb64(signature)
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(given, _sign(key, payload)):
        return None
    try:
        return payload.decode("utf-8").split("|")
    except UnicodeDecodeError:  # pragma: no cover - we only sign UTF-8
        return None


def verify_token(
    secret: bytes | None, token: str, *, rollout: str | None = None, now: float | None = None
) -> OverrideToken | None:
    """Return the override that ``token`` grants.

    ``None`` when it is forged, malformed, expired, or (with ``rollout``) for another rollout.
    """
    if secret is None:
        return None
    parts = _verified_payload(secret, token)
    if parts is None or len(parts) != 5 or parts[0] != "v1" or parts[1] != "override":
        return None
    _, _, name, variant, expires_text = parts
    if variant not in ("old", "new") or (rollout is not None and name != rollout):
        return None
    try:
        expires = int(expires_text)
    except ValueError:
        return None
    if expires <= (time.time() if now is None else now):
        return None
    return OverrideToken(name, "new" if variant == "new" else "old", expires)


def sign_value(secret: bytes, kind: str, value: str) -> str:
    """Sign ``value`` for a cookie of purpose ``kind`` (e.g. ``"pin"``, ``"user"``): ``value.signature``."""
    payload = f"v1|{kind}|{value}".encode()
    return f"{_b64(value.encode())}.{_b64(_sign(secret, payload))}"


def verify_value(secret: bytes | None, kind: str, signed: str) -> str | None:
    """Return the value signed by :func:`sign_value` for ``kind``, or ``None`` if it does not verify."""
    if secret is None or not isinstance(signed, str) or len(signed) > 4096 or signed.count(".") != 1:
        return None
    body, signature = signed.split(".")
    try:
        value = _unb64(body).decode("utf-8")
        given = _unb64(signature)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    expected = _sign(secret, f"v1|{kind}|{value}".encode())
    return value if hmac.compare_digest(given, expected) else None


def encode_pins(pins: Mapping[str, Variant]) -> str:
    """Serialise rollout → variant pins (``"checkout=new,search=old"``)."""
    return ",".join(f"{name}={variant}" for name, variant in sorted(pins.items()))


def decode_pins(text: str) -> dict[str, Variant]:
    """Parse :func:`encode_pins` output; malformed entries are skipped."""
    pins: dict[str, Variant] = {}
    for part in text.split(",")[:64]:
        name, _, variant = part.partition("=")
        if name and variant in ("old", "new"):
            pins[name] = "new" if variant == "new" else "old"
    return pins
