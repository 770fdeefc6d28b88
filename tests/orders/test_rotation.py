"""Data keys: rotation over orders sealed under two keys; a wrong or missing key stops the start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from seckill import cli, keys, personal
from seckill.orders.record import OrderRecord
from seckill.orders.store import Batch, OrderStore
from seckill.rotation import rotate
from seckill.settings import Settings

OLD, NEW = personal.new_key("k1"), personal.new_key("k2")
ADDRESS = personal.parse_address(
    {"name": "王芳", "phone": "+447911123456", "region": "London", "detail": "10 Downing St"}
)


def _order(n: int, sealer: personal.Sealer) -> OrderRecord:
    order_id = f"rot.{n:020x}"
    return OrderRecord(
        order_id=order_id,
        activity_id="rot",
        user_id=f"user{n}",
        quantity=1,
        status="reserved",
        created_at_ms=1_000 + n,
        expires_at_ms=901_000 + n,
        paid_at_ms=0,
        sku_id="sku",
        price_cents=100,
        address=sealer.seal(ADDRESS, order_id),
        address_hash=sealer.hash(ADDRESS),
    )


async def test_rotation_moves_orders_under_two_keys_to_the_first_resumably(
    store: OrderStore,
) -> None:
    under_old = personal.Sealer(OLD)
    under_new_first = personal.Sealer(f"{NEW},{OLD}")
    orders = [_order(n, under_old if n % 2 else under_new_first) for n in range(12)]
    await store.write(Batch(created=orders))

    # a run resumed from a cursor (say, after an interruption) starts after it
    resumed = await rotate(store, under_new_first, after=orders[5].order_id, batch=2)
    assert resumed["failed"] == 0 and resumed["cursor"] == orders[-1].order_id
    prefixes = [(await store.order(o.order_id)).address[:10] for o in orders]  # type: ignore[union-attr]
    assert prefixes[6:] == ["sm4gcm:k2:"] * 6
    assert prefixes[:6] != ["sm4gcm:k2:"] * 6, "nothing before the cursor was touched"
    first = await rotate(store, under_new_first, batch=2)
    assert first["failed"] == 0 and first["rotated"] == sum(
        1 for p in prefixes if p != "sm4gcm:k2:"
    )

    # only the new key is needed now, and every address still opens for its own order
    only_new = personal.Sealer(NEW)
    for order in orders:
        stored = await store.order(order.order_id)
        assert stored is not None
        assert only_new.open(stored.address, order.order_id) == ADDRESS
        assert stored.address_hash == only_new.hash(ADDRESS), "re-hashed with the new key"
    again = await rotate(store, under_new_first)
    assert again["rotated"] == 0, "a second run finds nothing left to do"


async def test_rotation_is_a_compare_and_set_and_skips_what_it_cannot_open(
    store: OrderStore,
) -> None:
    stranger = personal.Sealer(personal.new_key("k9"))
    orders = [_order(1, personal.Sealer(OLD)), _order(2, stranger)]
    await store.write(Batch(created=orders))
    first = orders[0]
    # the ciphertext changed since it was read: the write is refused, the row is left alone
    assert not await store.replace_address(first.order_id, "stale", "new", "h")
    assert (await store.order(first.order_id)).address == first.address  # type: ignore[union-attr]

    summary = await rotate(store, personal.Sealer(f"{NEW},{OLD}"), after="")
    assert summary["rotated"] == 1 and summary["failed"] == 1
    assert (await store.order(orders[1].order_id)).address == orders[1].address  # type: ignore[union-attr]

    # resuming after the cursor skips what is before it
    assert (await rotate(store, personal.Sealer(f"{NEW},{OLD}"), after=orders[1].order_id))[
        "failed"
    ] == 0


def test_a_ciphertext_names_its_key_and_only_opens_for_its_order() -> None:
    sealer = personal.Sealer(OLD)
    sealed = sealer.seal(ADDRESS, "a.1")
    assert sealed.startswith("sm4gcm:k1:")
    with pytest.raises(personal.DecryptError):
        sealer.open(sealed, "a.2")
    with pytest.raises(personal.DecryptError):
        personal.Sealer(NEW).open(sealed, "a.1")  # k1 not configured
    aes = personal.Sealer(personal.new_key("a1", "aes-256-gcm"), "aes-256-gcm")
    assert aes.open(aes.seal(ADDRESS, "a.1"), "a.1") == ADDRESS
    assert repr(ADDRESS) == "Address(<redacted>)"
    assert ADDRESS.masked()["phone"] == "+4479****3456"


@pytest.mark.parametrize(
    ("keys_text", "cipher", "fragment"),
    [
        ("k1", "sm4-gcm", "kid:base64key"),
        ("k1:not*base64", "sm4-gcm", "base64"),
        ("k1:" + "QUFB", "sm4-gcm", "bytes"),
        (f"{OLD},{OLD}", "sm4-gcm", "twice"),
        (OLD, "aes-256-gcm", "32 bytes"),
        (OLD, "rot13", "data.cipher"),
    ],
    # named, not numbered by their random key: every xdist worker must collect the same ids
    ids=["no-secret", "not-base64", "short", "twice", "aes-key-size", "unknown-cipher"],
)
def test_malformed_keys_stop_settings_with_one_clear_line(
    keys_text: str, cipher: str, fragment: str
) -> None:
    from seckill import settings as settings_module

    env = {"SECKILL_DATA_KEYS": keys_text, "SECKILL_DATA_CIPHER": cipher}
    with pytest.raises(settings_module.SettingsError) as raised:
        settings_module.load(environ=env)
    message = str(raised.value)
    assert fragment in message and "\n" not in message
    assert OLD.split(":", 1)[1] not in message, "a key never appears in an error"


def test_missing_and_wrong_keys_stop_the_start(settings: Settings, sync_redis: redis.Redis) -> None:
    sync_redis.sadd(keys.ACTIVITIES, "ships")
    sync_redis.hset(keys.meta("ships"), "requires_address", "1")
    problem = cli._data_key_problem(settings)
    assert problem is not None and "SECKILL_DATA_KEYS" in problem and "ships" in problem

    assert cli._data_key_problem(settings.replace("data", keys=OLD)) is None  # leaves a probe
    imposter = "k1:" + NEW.split(":", 1)[1]  # another key under the same id
    problem = cli._data_key_problem(settings.replace("data", keys=imposter))
    assert problem is not None and "wrong key" in problem
    assert cli._data_key_problem(settings.replace("data", keys=f"{NEW},{OLD}")) is None


def test_serve_with_a_malformed_key_exits_with_one_line(settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env |= {"SECKILL_REDIS_URL": settings.redis.url, "SECKILL_DATA_KEYS": "k1:%%%"}
    done = subprocess.run(
        [sys.executable, "-m", "seckill", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "SECKILL_DATA_KEYS" in done.stderr


def test_up_on_loopback_keeps_a_development_key(settings: Settings) -> None:
    first = cli._dev_data_keys(settings)
    assert first.data.keys.startswith("dev1:")
    assert cli._dev_data_keys(settings).data.keys == first.data.keys, "kept, not remade"
    personal.Sealer(first.data.keys)  # usable as it is
    public = settings.replace("server", host="0.0.0.0")
    assert cli._dev_data_keys(public).data.keys == "", "never made up for a public listener"


@pytest.mark.parametrize("command", ["writer", "serve"])
def test_writer_and_serve_refuse_to_start_without_the_key_an_activity_needs(
    settings: Settings, sync_redis: redis.Redis, command: str
) -> None:
    sync_redis.sadd(keys.ACTIVITIES, "ships")
    sync_redis.hset(keys.meta("ships"), "requires_address", "1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env |= {"SECKILL_REDIS_URL": settings.redis.url, "SECKILL_DEV": "1"}
    env["SECKILL_DATABASE_URL"] = f"sqlite:///{settings.server.var_dir}/orders.db"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "seckill",
            command,
            *(["--port", "0"] if command == "serve" else []),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.splitlines()[-1]  # (after the development-mode warning)
    assert last.startswith("seckill: activity 'ships' requires addresses")
    assert "SECKILL_DATA_KEYS" in last and "Traceback" not in done.stderr
