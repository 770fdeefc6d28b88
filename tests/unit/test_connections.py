"""SECKILL_REDIS_URL's three shapes are read, and a malformed one refused at boot by name."""

from __future__ import annotations

import pytest

from seckill import settings as settings_module
from seckill.connections import CLUSTER, SENTINEL, Target, parse
from seckill.settings import SettingsError


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h:6380/1", "unix:///tmp/r.sock"])
def test_a_single_node_url_is_no_target(url: str) -> None:
    assert parse(url) is None


def test_a_cluster_url_lists_its_startup_nodes() -> None:
    assert parse("redis+cluster://:s%40cret@10.0.0.1:7000, 10.0.0.2:7001,[::1]:7002") == Target(
        CLUSTER,
        (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)),
        None,
        "s@cret",
        "",
    )


def test_a_sentinel_url_names_the_primary() -> None:
    target = parse("redis+sentinel://u:p@s1:26379,s2:26379/seckill")
    assert target == Target(SENTINEL, (("s1", 26379), ("s2", 26379)), "u", "p", "seckill")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel://s1:26379", "primary's name"),
        ("redis+sentinel://s1:26379/", "primary's name"),
        ("redis+cluster://h:7000/0", "takes no path"),
        ("redis+cluster://h", "host:port"),
        ("redis+cluster://h:7000,", "host:port"),
        ("redis+cluster://h:99999", "host:port"),
        ("redis+cluster://:7000", "host:port"),
        ("redis+clutser://h:7000", "redis+cluster://"),
        ("redis:/h:6379", "redis+sentinel://"),
    ],
)
def test_a_malformed_url_is_refused_at_boot(url: str, why: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_module.load(environ={"SECKILL_REDIS_URL": url})
    message = str(caught.value)
    assert "redis.url (SECKILL_REDIS_URL)" in message
    assert why in message


def test_the_password_is_not_echoed_in_the_refusal() -> None:
    with pytest.raises(SettingsError) as caught:
        settings_module.load(environ={"SECKILL_REDIS_URL": "redis+cluster://u:hunter2@h"})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["redis+cluster://h1:7000,h2:7001", "redis+sentinel://h1:26379,h2:26379/seckill"]
)
def test_a_well_formed_url_loads(url: str) -> None:
    assert settings_module.load(environ={"SECKILL_REDIS_URL": url}).redis.url == url
