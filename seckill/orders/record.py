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
        )

    def public(self) -> dict[str, Any]:
        """Body of GET /api/v1/orders/{order_id}."""
        return {
            "order_id": self.order_id,
            "activity_id": self.activity_id,
            "user_id": self.user_id,
            "quantity": self.quantity,
            "status": self.status,
            "created_at": clock.to_rfc3339(self.created_at_ms),
            "expires_at": clock.to_rfc3339(self.expires_at_ms),
            "paid_at": clock.to_rfc3339(self.paid_at_ms) if self.paid_at_ms else None,
        }
