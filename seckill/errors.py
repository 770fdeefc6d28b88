"""One root error; each subclass carries the HTTP status and the contract's error code."""

from __future__ import annotations

from typing import ClassVar


class SeckillError(Exception):
    """Root of every error seckill answers to a client."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, *, retry_after: int | None = None) -> None:
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        self.retry_after = retry_after


class InvalidRequest(SeckillError):
    status, code, default_message = 400, "invalid_request", "the request is malformed"


class Unauthorized(SeckillError):
    status, code, default_message = 401, "unauthorized", "missing or invalid credentials"


class RiskRefused(SeckillError):
    """A risk rule refused the request; the message never says which (nor how to dodge it)."""

    status, code, default_message = 403, "risk_refused", "this request cannot be accepted"


class NotFound(SeckillError):
    status, code, default_message = 404, "not_found", "no such resource"


class MethodNotAllowed(SeckillError):
    status, code, default_message = 405, "method_not_allowed", "method not allowed here"


class Conflict(SeckillError):
    """409 with one of the contract's conflict codes."""

    status, code, default_message = 409, "conflict", "the change is not allowed now"


class SoldOut(Conflict):
    code, default_message = "sold_out", "sold out"


class LimitReached(Conflict):
    code, default_message = "limit_reached", "you already hold the most this activity allows"


class NotStarted(Conflict):
    code, default_message = "not_started", "the sale has not started yet"


class Ended(Conflict):
    code, default_message = "ended", "the sale has ended"


class NotCancellable(Conflict):
    code, default_message = "not_cancellable", "only a reserved order can be cancelled"


class NotPayable(Conflict):
    code, default_message = "not_payable", "only a reserved order within its deadline can be paid"


class IdempotencyConflict(Conflict):
    code, default_message = "idempotency_conflict", "a request with this key is in progress"


class PayloadTooLarge(SeckillError):
    status, code, default_message = 413, "payload_too_large", "request body too large"


class IdempotencyKeyReused(SeckillError):
    status = 422
    code = "idempotency_key_reused"
    default_message = "this Idempotency-Key was used with a different body"


class RateLimited(SeckillError):
    status, code, default_message = 429, "rate_limited", "too many requests, retry later"


class Unavailable(SeckillError):
    """503 family: always carries Retry-After."""

    status, code, default_message = 503, "overloaded", "service overloaded, retry later"

    def __init__(self, message: str | None = None, *, retry_after: int | None = 1) -> None:
        super().__init__(message, retry_after=retry_after)


class Degraded(Unavailable):
    code, default_message = "degraded", "this function is switched off for now"


class Paused(Unavailable):
    code, default_message = "paused", "this activity is paused"


class Overloaded(Unavailable):
    code, default_message = "overloaded", "service overloaded, retry later"


class PaymentUnavailable(Unavailable):
    code, default_message = "payment_unavailable", "the payment service cannot be reached, retry"


class RedisUnavailable(Overloaded):
    """Redis did not answer in time: never sell without it (fail closed)."""

    default_message = "stock service unavailable, retry later"


class NotReplicated(Overloaded):
    """durability = "replicated" and no replica confirmed the write in time.

    Redis answered, so the breaker does not count it (not a RedisUnavailable): the write is on
    the primary, and a retry with the same key replays it once a replica has it too.
    """

    default_message = "not yet replicated, retry with the same Idempotency-Key"


class RequestTimeout(SeckillError):
    """The body did not arrive within [server] body_timeout_s (the connection is closed)."""

    status, code, default_message = 408, "request_timeout", "request body not received in time"


class HeadersTooLarge(SeckillError):
    status, code, default_message = 431, "headers_too_large", "request headers too large"


class NotRegistered(SeckillError):
    status, code = 403, "not_registered"
    default_message = "this sale is open to registered users only, and you did not register"


class NotYourTurn(Conflict):
    """Always carries Retry-After: when to look again (GET .../queue tells more)."""

    code, default_message = "not_your_turn", "your turn to buy has not come"


class RegistrationClosed(Conflict):
    code, default_message = "registration_closed", "registration for this sale is not open"
