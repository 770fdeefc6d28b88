"""`seckill keys rotate`: stored addresses re-encrypted under the first data key.

Resumable and safe during a sale: it walks the store by order id (the cursor), only rows not
yet under the current key, and replaces each ciphertext with a compare-and-set on the old one,
so a row the writer changed meanwhile is simply picked up by the next run. Orders still live in
Redis keep the key they were sealed with until they leave Redis (every configured key decrypts).
"""

from __future__ import annotations

import logging

from seckill.orders.store import OrderStore
from seckill.personal import DecryptError, Sealer

log = logging.getLogger(__name__)


async def rotate(
    store: OrderStore, sealer: Sealer, after: str = "", batch: int = 500
) -> dict[str, object]:
    """Re-seal every stored address not under ``sealer``'s first key; counts and the cursor."""
    rotated = failed = raced = 0
    cursor = after
    while True:
        rows = await store.addresses(cursor, sealer.prefix, batch)
        if not rows:
            break
        for order_id, old in rows:
            try:
                new, new_hash = sealer.reseal(old, order_id)
            except DecryptError as exc:
                # named by order id only; left as it is for a person (or a later key list)
                log.error("order %s: address not rotated: %s", order_id, exc)
                failed += 1
                continue
            if await store.replace_address(order_id, old, new, new_hash):
                rotated += 1
            else:
                raced += 1
        cursor = rows[-1][0]
        log.info("rotated %d addresses so far; resume with --after %s", rotated, cursor)
    return {"rotated": rotated, "failed": failed, "changed_meanwhile": raced, "cursor": cursor}
