"""The draw: deterministic, blind to registration order; its proof catches every change."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import random

from seckill import lottery

SEED = "ab" * 32
USERS = [f"user-{i}" for i in range(200)]


def _draw(seed: str, users: list[str]) -> lottery.Draw:
    ordered = lottery.order(seed, users)
    return lottery.Draw(
        commitment=lottery.commitment(seed),
        seed=seed,
        drawn_at_ms=1,
        count=len(ordered),
        digest=lottery.digest(ordered),
    )


def test_the_order_is_the_documented_hmac_sort_whatever_the_registration_order() -> None:
    shuffled = USERS[:]
    random.Random(3).shuffle(shuffled)
    ordered = lottery.order(SEED, shuffled)
    assert ordered == lottery.order(SEED, USERS), "registration order plays no part"
    by_hand = sorted(
        USERS, key=lambda u: hmac.new(SEED.encode(), u.encode(), hashlib.sha256).digest()
    )
    assert ordered == by_hand
    assert lottery.commitment(SEED) == hashlib.sha256(SEED.encode()).hexdigest()
    assert lottery.order("cd" * 32, USERS) != ordered, "another seed, another order"


def test_a_draw_verifies_and_every_change_is_named() -> None:
    draw = _draw(SEED, USERS)
    placed = {u: i for i, u in enumerate(lottery.order(SEED, USERS), start=1)}
    assert lottery.problems(draw, USERS, placed) == []

    other_seed = dataclasses.replace(draw, seed="cd" * 32)
    assert any("commitment" in p for p in lottery.problems(other_seed, USERS, placed))

    assert lottery.problems(draw, [*USERS, "sybil"], None), "a registrant added afterwards"
    first, second = lottery.order(SEED, USERS)[:2]
    swapped = {**placed, first: 2, second: 1}
    assert any("positions in force" in p for p in lottery.problems(draw, USERS, swapped))
