"""User JWTs (HS256, claim sub) and the admin bearer token."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time

import jwt

from seckill.errors import Unauthorized

_CACHE_MAX = 200_000
_TOKEN_MAX = 4096
# t=<unix seconds>, v1=<64 hex>: the shape is checked before the body is read
_TIMESTAMP = re.compile(rb"[0-9]{1,12}")
_DIGEST = re.compile(rb"[0-9a-f]{64}")
_SIGNATURE_MAX = 1024
_SIGNATURES_MAX = 4


def header_bytes(value: str) -> bytes | None:
    """A header's own bytes (aiohttp surrogate-escapes non-UTF-8 ones); None if it has none."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return None


class UserAuth:
    """Verifies user tokens; remembers verified ones until they expire.

    A shopper taps "buy" many times with the same token within seconds: re-checking the
    signature each time is pure cost, and the cache key is the exact signed string.
    """

    def __init__(self, secret: str, *, leeway_s: int = 30, max_lifetime_s: int = 86_400) -> None:
        self._secret = secret
        self._leeway_s = leeway_s
        self._max_lifetime_s = max_lifetime_s
        # header -> (sub, exp, tier, openid); the tier and openid claims are "" when absent
        self._verified: dict[str, tuple[str, float, str, str]] = {}

    def user_id(self, authorization: str | None) -> str:
        """The token's ``sub``; Unauthorized when missing, malformed, expired or forged."""
        return self.user(authorization)[0]

    def user(self, authorization: str | None) -> tuple[str, str]:
        """(``sub``, member ``tier`` or ""); Unauthorized as for user_id."""
        subject, _exp, tier, _openid = self._claims(authorization)
        return subject, tier

    def payer(self, authorization: str | None) -> tuple[str, str]:
        """(``sub``, WeChat ``openid`` or "" when the token has none); Unauthorized as above."""
        subject, _exp, _tier, openid = self._claims(authorization)
        return subject, openid

    def _claims(self, authorization: str | None) -> tuple[str, float, str, str]:
        # keyed by the whole header: a hit costs one lookup and one clock read
        hit = self._verified.get(authorization) if authorization else None
        if hit is not None:
            # kept until exp only: past it the token is checked again (with the leeway)
            if hit[1] > time.time():
                return hit
            del self._verified[authorization]  # type: ignore[arg-type]
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("a Bearer token is required")
        token = authorization[7:].strip()
        if len(token) > _TOKEN_MAX or not token.isascii():
            raise Unauthorized("invalid or expired token")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                options={"require": ["exp", "sub"]},
                leeway=self._leeway_s,
            )
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
            raise Unauthorized("invalid or expired token") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not 1 <= len(subject) <= 64:
            raise Unauthorized("token subject must be a user id of 1-64 characters")
        tier = claims.get("tier", "")
        if not isinstance(tier, str) or len(tier) > 32:
            raise Unauthorized("token tier must be a string of at most 32 characters")
        openid = claims.get("openid", "")
        # WeChat's openid: 28 characters today; a bound keeps a forged claim from costing much
        if not isinstance(openid, str) or len(openid) > 128:
            raise Unauthorized("token openid must be a string of at most 128 characters")
        exp = self._lifetime_checked(claims)
        if len(self._verified) >= _CACHE_MAX:
            self._verified.clear()
        verified = (subject, exp, tier, openid)
        self._verified[authorization] = verified
        return verified

    def _lifetime_checked(self, claims: dict[str, object]) -> float:
        """exp, when exp/iat/nbf are numbers and the lifetime is within the maximum."""
        times: dict[str, float] = {}
        for name in ("exp", "iat", "nbf"):
            if name not in claims:
                continue
            value = claims[name]
            # PyJWT takes int("1700000000") for a string: the contract says a number
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Unauthorized(f"token {name} must be a number")
            if not math.isfinite(value):
                raise Unauthorized(f"token {name} must be a number")
            times[name] = float(value)
        exp = times["exp"]
        start = times.get("iat", time.time())
        if exp - start > self._max_lifetime_s:
            raise Unauthorized("token lifetime over the accepted maximum")
        return exp

    def mint(self, user_id: str, ttl_s: int, tier: str = "", openid: str = "") -> str:
        """A signed token for ``user_id`` (member ``tier``, WeChat ``openid`` if given) valid
        for ``ttl_s`` s."""
        if not 1 <= len(user_id) <= 64:
            raise ValueError("user id must be 1-64 characters")
        if len(tier) > 32:
            raise ValueError("tier must be at most 32 characters")
        now = int(time.time())
        claims: dict[str, str | int] = {"sub": user_id, "iat": now, "exp": now + ttl_s}
        if tier:
            claims["tier"] = tier
        if openid:
            claims["openid"] = openid
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

    def check_header(self, header: str | None) -> tuple[bytes, list[bytes]]:
        """(t, v1 digests) from a well-formed header with a fresh t; Unauthorized otherwise.

        Done before the body is read: a forged or stale callback costs no body read.
        Everything is compared as bytes, so no header content can raise.
        """
        if not header:
            raise Unauthorized("Seckill-Signature header required")
        raw = header_bytes(header)
        if raw is None or len(raw) > _SIGNATURE_MAX:
            raise Unauthorized("malformed Seckill-Signature")
        stamps: list[bytes] = []
        digests: list[bytes] = []
        for item in raw.split(b","):
            name, _, value = item.strip().partition(b"=")
            if name == b"t":
                stamps.append(value)
            elif name == b"v1":
                digests.append(value)
        if len(stamps) != 1 or not _TIMESTAMP.fullmatch(stamps[0]):
            raise Unauthorized("malformed Seckill-Signature")
        if not digests or len(digests) > _SIGNATURES_MAX:
            raise Unauthorized("malformed Seckill-Signature")
        if not all(_DIGEST.fullmatch(digest) for digest in digests):
            raise Unauthorized("malformed Seckill-Signature")
        if abs(time.time() - int(stamps[0])) > self._tolerance_s:
            raise Unauthorized("Seckill-Signature timestamp outside the tolerance")
        return stamps[0], digests

    def check_body(self, checked: tuple[bytes, list[bytes]], body: bytes) -> None:
        """Unauthorized unless one of the header's v1 digests signs ``body``."""
        t, digests = checked
        expected = hmac.new(self._secret, t + b"." + body, hashlib.sha256).hexdigest().encode()
        if not any(hmac.compare_digest(expected, given) for given in digests):
            raise Unauthorized("Seckill-Signature does not match")

    def verify(self, header: str | None, body: bytes) -> None:
        """Unauthorized unless a v1 signature matches and t is within the tolerance."""
        self.check_body(self.check_header(header), body)


class AdminAuth:
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def check(self, authorization: str | None) -> None:
        """Unauthorized unless the header is exactly the admin bearer token (constant time)."""
        given = header_bytes(authorization or "")
        if given is None:
            raise Unauthorized("admin token required")
        if not hmac.compare_digest(given, self._expected):
            raise Unauthorized("admin token required")
