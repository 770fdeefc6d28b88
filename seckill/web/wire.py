"""The order lane's answers spelled as HTTP/1.1 bytes, as aiohttp would write them.

The protocol lane (web/lane.py) answers an order POST without a request or response object:
the status line, the headers in aiohttp's order (the response's own, then Content-Length,
Date, Server) and the body, in one buffer for one socket write. Every answer but the 202 is
one of a few shapes (a refusal per contract error, a 429 per wait), spelled once from the very
web.Response the routed handler would return, and kept; only the Date (aiohttp's own clock,
one string per second) is put in per answer. The 202 is spelled per order, as the routed
handler spells its body (web/public.py).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE

from seckill import clock, keys
from seckill.errors import SeckillError
from seckill.limits import retry_after_s
from seckill.purchase import Decision
from seckill.stock import Outcome
from seckill.web import public
from seckill.web.middlewares import error_response, refusal

# what follows the Date: the Server header, the end of the head
_AFTER_DATE = f"\r\nServer: {SERVER_SOFTWARE}\r\n\r\n".encode()
# spelled answers kept: contract errors x messages, and 429s by (seconds, burst)
_KEPT_MAX = 512


class Spelled:
    """One response as bytes: ``head`` up to the Date's value, ``tail`` after it."""

    __slots__ = ("head", "outcome", "status", "tail")

    def __init__(self, head: bytes, tail: bytes, status: int, outcome: str) -> None:
        self.head = head
        self.tail = tail
        self.status = status
        self.outcome = outcome

    def bytes(self, date: bytes) -> bytes:
        """The whole answer with ``date`` as its Date."""
        return self.head + date + self.tail


def spell(response: web.Response, outcome: str) -> Spelled:
    """``response`` (a body of bytes, nothing streamed) as aiohttp writes it on a kept-alive
    HTTP/1.1 connection."""
    body = response.body
    assert isinstance(body, bytes), "only responses with a body of bytes are spelled"
    lines = [f"HTTP/1.1 {response.status} {response.reason}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in response.headers.items()]
    lines.append(f"Content-Length: {len(body)}\r\nDate: ")
    return Spelled("".join(lines).encode(), _AFTER_DATE + body, response.status, outcome)


class Dates:
    """aiohttp's Date header value (one string per second), encoded once per second."""

    __slots__ = ("_bytes", "_text")

    def __init__(self) -> None:
        self._text = ""
        self._bytes = b""

    def now(self) -> bytes:
        """The Date of an answer written now."""
        text = rfc822_formatted_time()
        if text is not self._text:
            self._text = text
            self._bytes = text.encode()
        return self._bytes


class Answers:
    """Decisions and raised contract errors as bytes, the kept shapes spelled once."""

    def __init__(self) -> None:
        self.dates = Dates()
        self._refusals: dict[tuple[int, str, str, int | None], Spelled] = {}
        self._raised: dict[tuple[int, str, str, int | None], Spelled] = {}
        self._limited: dict[tuple[int, int], Spelled] = {}

    def decision(self, activity_id: str, decision: Decision) -> tuple[bytes, str]:
        """The routed handler's answer to ``decision`` (web/public.answer_of), and its outcome
        as the request counts label it."""
        error = decision.error
        if error is not None:
            shape = (error.status, error.code, error.message, error.retry_after)
            spelled = self._refusals.get(shape)
            if spelled is None:
                spelled = spell(refusal(error), error.code)
                if len(self._refusals) < _KEPT_MAX:
                    self._refusals[shape] = spelled
            return spelled.bytes(self.dates.now()), spelled.outcome
        reservation = decision.reservation
        if reservation is None:
            assert decision.limited is not None
            wait, burst = decision.limited
            # the answer depends on the whole seconds and the burst only (web/public.py)
            seconds_and_burst = (retry_after_s(wait), max(int(burst), 1))
            spelled = self._limited.get(seconds_and_burst)
            if spelled is None:
                spelled = spell(public.rate_limited(wait, burst), "rate_limited")
                if len(self._limited) < _KEPT_MAX:
                    self._limited[seconds_and_burst] = spelled
            return spelled.bytes(self.dates.now()), spelled.outcome
        order_id = reservation.order_id
        replayed = "Idempotent-Replayed: true\r\n" if reservation.outcome is Outcome.REPLAY else ""
        if not keys.ORDER_ID_PATTERN.fullmatch(order_id):  # pragma: no cover - seckill's own
            response = public.answer_of(activity_id, decision)
            return spell(response, "ok").bytes(self.dates.now()), "ok"
        body = (
            f'{{"order_id": "{order_id}", "activity_id": "{activity_id}", '
            f'"quantity": {reservation.quantity}, "status": "reserved", '
            f'"expires_at": "{clock.to_rfc3339(reservation.expires_at_ms)}"}}'
        ).encode()
        head = (
            "HTTP/1.1 202 Accepted\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Location: /api/v1/orders/{order_id}\r\n"
            f"{replayed}"
            f"Content-Length: {len(body)}\r\nDate: "
        ).encode()
        return head + self.dates.now() + _AFTER_DATE + body, "ok"

    def raised(self, error: SeckillError) -> bytes:
        """The error middleware's answer to a raised contract error."""
        shape = (error.status, error.code, error.message, error.retry_after)
        spelled = self._raised.get(shape)
        if spelled is None:
            response = error_response(error.status, error.code, error.message, error.retry_after)
            spelled = spell(response, error.code)
            if len(self._raised) < _KEPT_MAX:
                self._raised[shape] = spelled
        return spelled.bytes(self.dates.now())

    def plain(self, status: int, code: str, message: str) -> bytes:
        """A contract error body for what no SeckillError describes (500 internal)."""
        return spell(error_response(status, code, message), code).bytes(self.dates.now())
