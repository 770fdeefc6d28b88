"""The purchase decision: one order POST, already parsed, taken through the contract's checks.

Read top to bottom it is the contract's order after the request's shape: quantity and SKU
(400) → what this process decides (switches, the deny list, the local admission bucket) → the
sold-out fast path → velocity counts → one atomic script that answers idempotency, switches,
registration and turn, risk rules, rate limits, window, per-user limit and stock, in that
order. Knows no HTTP: the handler turns the
Decision into a response.

A bucketed activity (seckill/buckets.py) runs the script in the buyer's home bucket; when that
bucket cannot serve the order, units are moved to it from the others and the order is tried
again there, so sold out is answered only once all buckets together have nothing left.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING

from seckill import buckets, clock, skus
from seckill.breakers import BreakerOpen
from seckill.errors import (
    Degraded,
    Ended,
    IdempotencyKeyReused,
    LimitReached,
    NotFound,
    NotRegistered,
    NotStarted,
    NotYourTurn,
    Overloaded,
    Paused,
    RateLimited,
    RiskRefused,
    SeckillError,
    SoldOut,
)
from seckill.limits import retry_after_s
from seckill.skus import OrderRequest
from seckill.stock import NO_LIMITS, Outcome, Reservation

if TYPE_CHECKING:
    from seckill.activities import Activity
    from seckill.buckets import Buckets
    from seckill.catalog import Entry
    from seckill.limits import Rule
    from seckill.risk import Screening
    from seckill.web.state import Services

_REDIS_DOWN = Overloaded("stock service unavailable, retry later", retry_after=2)
# stock still in transit between buckets after this many moves: the buyer retries shortly
_MOVE_ROUNDS = 8
_MOVING = Overloaded("the stock is moving between buckets, retry", retry_after=1)
_SOLD_OUT = SoldOut()
_ENDED = Ended()
_RISK_REFUSED = RiskRefused()
# switches and limits decided in the gateway, answered by the script after idempotency
GATES: dict[str, SeckillError] = {
    "degraded": Degraded("flash sales are switched off for now"),
    "paused": Paused("this activity is paused"),
    "ended": _ENDED,
    "rate_limited": RateLimited(),
    # the writers are behind by more than [writer] backlog_ceiling: accept nothing new until
    # they catch up (fail closed: nothing reserved, nothing lost)
    "overloaded": Overloaded("orders are waiting to be written, retry shortly", retry_after=2),
}
_REFUSALS: dict[Outcome, SeckillError] = {
    Outcome.NOT_FOUND: NotFound("no such activity"),
    Outcome.REUSED: IdempotencyKeyReused(),
    Outcome.NOT_STARTED: NotStarted(),
    Outcome.ENDED: _ENDED,
    Outcome.LIMIT_REACHED: LimitReached(),
    Outcome.SOLD_OUT: _SOLD_OUT,
    Outcome.NOT_REGISTERED: NotRegistered(),
    Outcome.RISK_REFUSED: _RISK_REFUSED,
}
_TURN_MESSAGES = {
    "waiting": "your turn to buy has not come yet; GET .../queue shows where you stand",
    "passed": "your turn to buy has passed: your claim window closed",
    "used": "your turn to buy was used by an order you placed",
    "draw": "the draw is being made; your turn comes in the drawn order",
}


@dataclass(frozen=True, slots=True)
class Decision:
    """Exactly one of: an accepted (or replayed) reservation, a refusal, a rate limit."""

    reservation: Reservation | None = None
    error: SeckillError | None = None
    # 429: seconds until a token is back, and the bucket's burst (RateLimit-* headers)
    limited: tuple[float, float] | None = None


_ANSWERED = {
    error: Decision(error=error) for error in (_SOLD_OUT, _ENDED, _RISK_REFUSED, *GATES.values())
}


def decide(
    services: Services,
    entry: Entry,
    user_id: str,
    tier: str,
    order: OrderRequest,
    idempotency_key: str,
    device: str,
    remote: str | None,
) -> Decision | Coroutine[None, None, Decision]:
    """Reserve for the caller, or say why not (the first check that fails answers).

    The Decision itself when this process answers alone (the sold-out fast path: no
    coroutine is made for the storm's common case), else the coroutine that asks Redis.
    """
    activity = entry.activity
    activity_id = activity.id
    terms = skus.with_address(skus.resolve(activity, order, tier), order.address, services.personal)

    # the gateway's part of the contract's order: switches -> risk rules -> rate limits; the
    # script answers the first that applies after the idempotency check
    switches = services.switches
    gate = switches.gate(activity_id)
    if not gate and entry.over_ceiling:
        gate = "overloaded"
    risk = services.risk
    rule = services.limits.for_activity(activity_id)
    factor = switches.value("admission.factor")
    if entry.sold_out_for(user_id, terms.sku_id):
        # the storm's common case: no Redis round trip for a user who holds nothing here;
        # the answer is still the first that applies of switches, deny list, rate limits,
        # window, stock (velocity is not counted: this attempt can buy nothing). Registration
        # and turns are not asked: once sold out, it is sold out for everyone holding nothing.
        if gate:
            return _ANSWERED[GATES[gate]]
        if not risk.denies_nobody:  # else no subject is even hashed
            screening = risk.screen_locally(risk.subject(user_id, device, remote))
            if screening.hits:
                risk.record(activity_id, screening.subject, screening.hits)
            if screening.refused:
                return _ANSWERED[_RISK_REFUSED]
        wait = services.limits.admit(activity_id, rule, factor)
        if wait:
            return Decision(limited=(wait, rule.admission_burst))
        return _ANSWERED[_ENDED if clock.now_ms() >= activity.ends_at_ms else _SOLD_OUT]
    screening = risk.screen_locally(risk.subject(user_id, device, remote))
    return _reserve(
        services, entry, user_id, order, idempotency_key, remote, terms, gate, screening, rule
    )


async def _reserve(
    services: Services,
    entry: Entry,
    user_id: str,
    order: OrderRequest,
    idempotency_key: str,
    remote: str | None,
    terms: skus.OrderTerms,
    gate: str,
    screening: Screening,
    rule: Rule,
) -> Decision:
    """The Redis part of decide: velocity, the local admission bucket, the purchase script."""
    activity = entry.activity
    activity_id = activity.id
    risk = services.risk
    factor = services.switches.value("admission.factor")
    wait = 0.0
    # velocity: on one Redis the purchase script counts it in its own step (no round trip of
    # its own); on a Cluster each subject's counter sits in a slot of its own, asked first
    count_in_script = risk.one_call and not gate and not screening.refused
    if not gate and not screening.refused and not count_in_script:
        try:
            screening = await services.redis_breaker.call(lambda: risk.screen_velocity(screening))
        except BreakerOpen:
            return Decision(error=_REDIS_DOWN)
    if not gate and not screening.refused:
        # the local admission bucket: no network round trip (the exact one is in Redis)
        wait = services.limits.admit(activity_id, rule, factor)
        if wait:
            gate = "rate_limited"
    count = activity.buckets
    # the user's bucket holds everything of theirs: one slot, an exact per-user limit
    space = activity_id if count == 1 else buckets.home(activity_id, count, user_id)
    risk_parts = risk.script_parts(space, activity_id, screening, velocity=count_in_script)

    def attempt(again: bool = False) -> Awaitable[Reservation]:
        # tried again after a move: the attempt's tokens and velocity were counted already
        limits = NO_LIMITS if again else rule.redis_limits(factor).per_bucket(count)
        parts = risk_parts
        if again and count_in_script:
            parts = risk.script_parts(space, activity_id, screening)
        return services.stock.reserve(
            space,
            user_id,
            idempotency_key,
            order.quantity,
            gate,
            limits,
            remote or "",
            terms,
            parts,
            fair=activity.registration,
        )

    try:
        reservation = await services.redis_breaker.call(attempt)
        if reservation.outcome is Outcome.SOLD_OUT and count > 1:
            reservation = await services.redis_breaker.call(
                lambda: from_other_buckets(
                    services.stock.buckets, activity, space, order.quantity, attempt
                )
            )
    except BreakerOpen:
        # fail closed: never sell without Redis; retry once the breaker has probed again
        return Decision(error=_REDIS_DOWN)
    if reservation.risk_hits:
        risk.record(activity_id, screening.subject, reservation.risk_hits, terms.address_hash)
    elif screening.hits and gate == "rate_limited" and reservation.outcome is Outcome.GATED:
        # the local admission refused after the risk rules let it pass in shadow: still a hit
        risk.record(activity_id, screening.subject, screening.hits)
    outcome = reservation.outcome
    if outcome is Outcome.OK:
        services.catalog.note_reserved(
            activity_id, reservation.stock_left or 0, terms.sku_id, reservation.sku_left
        )
    if outcome in (Outcome.OK, Outcome.REPLAY):
        return Decision(reservation=reservation)
    if outcome is Outcome.SOLD_OUT:
        services.catalog.note_sold_out(activity_id)
    if outcome in (Outcome.NOT_YOUR_TURN, Outcome.UNDRAWN):
        if outcome is Outcome.UNDRAWN:
            services.lottery.kick(activity_id)  # lazily, once: the first call after the start
        seconds = retry_after_s(reservation.retry_after_ms / 1000)
        message = _TURN_MESSAGES.get(reservation.turn)
        return Decision(error=NotYourTurn(message, retry_after=seconds))
    if outcome in (Outcome.STALE, Outcome.UNKNOWN_SKU):
        # this process's definition is older than Redis's: re-read it; the buyer retries
        await services.catalog.reload(activity_id)
        return Decision(error=Overloaded("the activity just changed, retry", retry_after=1))
    if reservation.gate == "rate_limited":
        if reservation.retry_after_ms:  # a Redis bucket (user or ip) refused it
            scope_burst = rule.user_burst if rule.user_rate_per_s else rule.ip_burst
            services.limits.count(activity_id, "redis", False)
            return Decision(limited=(reservation.retry_after_ms / 1000, scope_burst))
        return Decision(limited=(wait, rule.admission_burst))
    error = _REFUSALS.get(outcome) or GATES.get(reservation.gate)
    if error is None:
        raise Overloaded(f"refused: {reservation.gate}")
    return Decision(error=error)


async def from_other_buckets(
    moving: Buckets,
    activity: Activity,
    space: str,
    quantity: int,
    attempt: Callable[[bool], Awaitable[Reservation]],
) -> Reservation:
    """The home bucket ``space`` said sold_out: move units to it from the others, try again.

    ``attempt(True)`` runs the purchase script in the home bucket once more. Sold out stands
    only once the buckets together hold fewer than ``quantity`` (what one Redis would have
    answered: in the storm after a sell-out that is one pipelined read); a home bucket that
    others keep emptying is refilled again.
    """
    for _ in range(_MOVE_ROUNDS):
        survey = await moving.survey(activity.id, activity.buckets)
        if survey.left < quantity:
            return Reservation(Outcome.SOLD_OUT)
        await moving.refill(survey, space, quantity)
        reservation = await attempt(True)
        if reservation.outcome is not Outcome.SOLD_OUT:
            return reservation
    raise _MOVING
