"""schemathesis against the live gateway: no 5xx, every answer as described, bad input refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.config._checks import (
    NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES,
    NegativeDataRejectionConfig,
)
from schemathesis.specs.openapi.checks import positive_data_acceptance

from seckill import resources
from seckill import settings as settings_module
from seckill.auth import PaymentSignature, UserAuth
from tests.helpers import activity_body

schema = schemathesis.openapi.from_path(str(resources.openapi_path()))
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=60
)
# bad data too big for the edge's budgets is refused there, before it is parsed: 413 (body) and
# 431 (request line and headers) are rejections too
schema.config.checks.negative_data_rejection = NegativeDataRejectionConfig(
    expected_statuses=[*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413", "431"]
)

_SETTINGS = settings_module.load(environ={})
# with a WeChat openid: the payment endpoint reads it before it looks for the order
_TOKEN = UserAuth(_SETTINGS.jwt.secret).mint("fuzzer", 3600, openid="o-fuzzer")
_USER = {"Authorization": f"Bearer {_TOKEN}"}
_ADMIN = {"Authorization": f"Bearer {_SETTINGS.admin.token}"}
_SIGNER = PaymentSignature(_SETTINGS.payment.secret, _SETTINGS.payment.tolerance_s)
LIVE_ACTIVITY = "fuzz-live"
# Rules JSON Schema cannot state (ends_at after starts_at; quantity at most the stored
# activity's per_user_limit): schema-valid bodies may still be 400 there, so only those two
# operations skip the "valid data is accepted" check. Every other check still runs on them.
_CROSS_FIELD_RULES = {
    "/admin/v1/activities",
    "/api/v1/activities/{activity_id}/orders",
    "/api/v1/payments/notify",  # the amount must match the order's price times quantity
    "/admin/v1/flags/{name}",  # a value's type depends on the flag's name
    "/admin/v1/risk/deny/{kind}/{value}",  # a value's form depends on its kind (device, ip)
}


@pytest.fixture(scope="module")
def seeded(live_gateway: str) -> str:
    """A live activity, so that generated orders also reach the script, not only the 404."""
    body = activity_body(id=LIVE_ACTIVITY, stock=1_000_000, per_user_limit=1000)
    response = requests.post(f"{live_gateway}/admin/v1/activities", json=body, headers=_ADMIN)
    assert response.status_code in (201, 409), response.text
    return live_gateway


def test_the_served_description_is_the_file(seeded: str) -> None:
    served = requests.get(f"{seeded}/openapi.json", timeout=5).json()
    assert served == schema.raw_schema


@schema.parametrize()
def test_api_conforms(case: Any, seeded: str) -> None:
    headers: dict[str, str] = {}
    security = case.operation.definition.raw.get("security")
    if _negative_headers(case):
        security = None  # the case is about missing or bad headers: add no credentials to it
    if security and "admin" in security[0]:
        headers.update(_ADMIN)
    elif security and "user" in security[0]:
        headers.update(_USER)
    elif security and "payment" in security[0] and isinstance(case.body, dict):
        raw = json.dumps(case.body).encode()
        headers["Seckill-Signature"] = _SIGNER.sign(raw)
        case.body = None
        # send exactly the bytes that were signed
        case.headers = {**(case.headers or {}), "Content-Type": "application/json"}
        return _call_signed(case, seeded, headers, raw)
    positive = case.meta is None or case.meta.generation.mode is GenerationMode.POSITIVE
    aimed = positive and "activity_id" in (case.path_parameters or {})
    # half the positive cases aim at an activity that exists and is on sale
    if aimed and hash(str(case.body)) % 2 == 0:
        case.path_parameters["activity_id"] = LIVE_ACTIVITY
    if case.path == "/admin/v1/live":
        _bounded_stream(case)
    excluded = []
    if case.method in ("POST", "PUT", "DELETE") and case.path in _CROSS_FIELD_RULES:
        excluded.append(positive_data_acceptance)
    case.call_and_validate(base_url=seeded, headers=headers, excluded_checks=excluded)


def _call_signed(case: Any, base_url: str, headers: dict[str, str], raw: bytes) -> None:
    """Payment callbacks are signed over the raw body, so the body is sent as those bytes."""
    response = case.call(base_url=base_url, headers=headers, data=raw)
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


def _negative_headers(case: Any) -> bool:
    components = getattr(case.meta, "components", None) or {}
    return any(
        getattr(location, "value", location) == "header" and info.mode is GenerationMode.NEGATIVE
        for location, info in components.items()
    )


def _bounded_stream(case: Any) -> None:
    """The live stream runs until its client leaves: a valid ``events`` becomes 1 snapshot.

    An invalid one (not an integer, out of range) is kept: it must be refused with 400.
    """
    query = dict(case.query or {})
    raw = query.get("events")
    if raw is None or (isinstance(raw, int | str) and str(raw).isascii() and str(raw).isdigit()):
        query["events"] = 1
    case.query = query


def test_every_error_code_the_gateway_can_send_is_in_the_contract() -> None:
    """The Error schema's code enum names every code of seckill.errors and the middleware's
    own (a fuzzed request line over the edge's budget once met a 431 the enum did not list)."""
    import yaml

    from seckill import errors
    from seckill.web.middlewares import _HTTP_CODES

    document = yaml.safe_load(resources.openapi_path().read_text())
    listed = set(
        document["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"][
            "enum"
        ]
    )
    sent = {"internal", "client_closed", *_HTTP_CODES.values()}
    pending = [errors.SeckillError]
    while pending:
        kind = pending.pop()
        pending += kind.__subclasses__()
        if kind.__dict__.get("code"):
            sent.add(kind.code)
    assert sent - listed == set()
