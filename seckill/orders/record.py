"""The order record as Redis holds it (msgpack) and as the API shows it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from seckill import clock


@dataclass(frozen=True, slots=True)
class OrderRecord:
    order_id: str
    activity_id: str
    user_id: str
    quantity: int
    status: str
    created_at_ms: int
    expires_at_ms: int
    paid_at_ms: int  # 0 while unpaid
    sku_id: str = ""  # "": an order from before SKUs
    price_cents: int = -1  # the unit price it was sold at; -1: from before SKUs (the activity's)
    tier: str = ""  # the member tier it was sold under ("" none)
    # personal data only as ciphertext (seckill.personal): decrypted for the owner alone
    address: str = ""
    address_hash: str = ""  # keyed hash of the normalised address, for risk rules

    @classmethod
    def unpack(cls, blob: bytes) -> OrderRecord:
        """Decode the msgpack map written by the Lua scripts."""
        data: dict[str, Any] = msgpack.unpackb(blob, raw=False)
        return cls(
            order_id=data["order_id"],
            activity_id=data["activity_id"],
            user_id=data["user_id"],
            quantity=int(data["quantity"]),
            status=data["status"],
            created_at_ms=int(data["created_at"]),
            expires_at_ms=int(data["expires_at"]),
            paid_at_ms=int(data.get("paid_at") or 0),
            sku_id=data.get("sku_id") or "",
            price_cents=int(data.get("price_cents", -1)),
            tier=data.get("tier") or "",
            address=data.get("address") or "",
            address_hash=data.get("address_hash") or "",
        )

    def public(self) -> dict[str, Any]:
        """Body of GET /api/v1/orders/{order_id} (the address is added by its owner's reader)."""
        body = {
            "order_id": self.order_id,
            "activity_id": self.activity_id,
            "user_id": self.user_id,
            "quantity": self.quantity,
            "status": self.status,
            "created_at": clock.to_rfc3339(self.created_at_ms),
            "expires_at": clock.to_rfc3339(self.expires_at_ms),
            "paid_at": clock.to_rfc3339(self.paid_at_ms) if self.paid_at_ms else None,
        }
        if self.sku_id:
            body["sku_id"] = self.sku_id
            body["price_cents"] = self.price_cents
        if self.tier:
            body["tier"] = self.tier
        return body
