"""User JWTs (HS256, claim sub) and the admin bearer token."""

from __future__ import annotations

import hashlib
import hmac
import time

import jwt

from seckill.errors import Unauthorized

_CACHE_MAX = 200_000


class UserAuth:
    """Verifies user tokens; remembers verified ones until they expire.

    A shopper taps "buy" many times with the same token within seconds: re-checking the
    signature each time is pure cost, and the cache key is the exact signed string.
    """

    def __init__(self, secret: str) -> None:
        self._secret = secret
        # token -> (sub, exp, tier); the tier claim is "" when absent
        self._verified: dict[str, tuple[str, float, str]] = {}

    def user_id(self, authorization: str | None) -> str:
        """The token's ``sub``; Unauthorized when missing, malformed, expired or forged."""
        return self.user(authorization)[0]

    def user(self, authorization: str | None) -> tuple[str, str]:
        """(``sub``, member ``tier`` or ""); Unauthorized as for user_id."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("a Bearer token is required")
        token = authorization[7:].strip()
        hit = self._verified.get(token)
        if hit is not None:
            if hit[1] > time.time():
                return hit[0], hit[2]
            del self._verified[token]
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                options={"require": ["exp", "sub"]},
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized("invalid or expired token") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not 1 <= len(subject) <= 64:
            raise Unauthorized("token subject must be a user id of 1-64 characters")
        tier = claims.get("tier", "")
        if not isinstance(tier, str) or len(tier) > 32:
            raise Unauthorized("token tier must be a string of at most 32 characters")
        if len(self._verified) >= _CACHE_MAX:
            self._verified.clear()
        self._verified[token] = (subject, float(claims["exp"]), tier)
        return subject, tier

    def mint(self, user_id: str, ttl_s: int, tier: str = "") -> str:
        """A signed token for ``user_id`` (member ``tier`` if given) valid for ``ttl_s`` s."""
        if not 1 <= len(user_id) <= 64:
            raise ValueError("user id must be 1-64 characters")
        if len(tier) > 32:
            raise ValueError("tier must be at most 32 characters")
        now = int(time.time())
        claims: dict[str, str | int] = {"sub": user_id, "iat": now, "exp": now + ttl_s}
        if tier:
            claims["tier"] = tier
        return jwt.encode(claims, self._secret, algorithm="HS256")


class PaymentSignature:
    """``Seckill-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``."""

    def __init__(self, secret: str, tolerance_s: int) -> None:
        self._secret = secret.encode()
        self._tolerance_s = tolerance_s

    def sign(self, body: bytes, at: int | None = None) -> str:
        """The header value for ``body`` (what the payment provider sends; used in tests)."""
        t = int(time.time()) if at is None else at
        digest = hmac.new(self._secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        return f"t={t},v1={digest}"

    def verify(self, header: str | None, body: bytes) -> None:
        """Unauthorized unless a v1 signature matches and t is within the tolerance."""
        if not header:
            raise Unauthorized("Seckill-Signature header required")
        parts: dict[str, list[str]] = {}
        for item in header.split(","):
            name, _, value = item.strip().partition("=")
            parts.setdefault(name, []).append(value)
        try:
            t = int(parts["t"][0])
        except (KeyError, ValueError):
            raise Unauthorized("malformed Seckill-Signature") from None
        if abs(time.time() - t) > self._tolerance_s:
            raise Unauthorized("Seckill-Signature timestamp outside the tolerance")
        expected = hmac.new(self._secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        if not any(hmac.compare_digest(expected, given) for given in parts.get("v1", [])):
            raise Unauthorized("Seckill-Signature does not match")


class AdminAuth:
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def check(self, authorization: str | None) -> None:
        """Unauthorized unless the header is exactly the admin bearer token (constant time)."""
        given = (authorization or "").encode()
        if not hmac.compare_digest(given, self._expected):
            raise Unauthorized("admin token required")
