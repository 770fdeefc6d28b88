"""The designs a team would otherwise ship, behind the same HTTP request as seckill's purchase.

    python benchmarks/naive.py PORT watch  REDIS_URL  STOCK JWT_SECRET
    python benchmarks/naive.py PORT select POSTGRES_URL STOCK JWT_SECRET

watch:  Redis WATCH stock / GET / MULTI DECR + RPUSH / EXEC, up to 3 tries; a request whose
        transactions keep aborting answers 409 conflict (counted as a failure).
select: PostgreSQL BEGIN; SELECT stock FOR UPDATE; UPDATE; INSERT order; COMMIT.
Both check the user's JWT on every request (PyJWT, no cache), as such a service would.
"""

from __future__ import annotations

import sys

import asyncpg
import jwt
import uvloop
from aiohttp import web
from redis import exceptions as redis_errors
from redis.asyncio import Redis

TRIES = 3


def _refuse(status: int, code: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": code}}, status=status)


def _user(request: web.Request, secret: str) -> str | None:
    header = request.headers.get("Authorization", "")
    try:
        claims = jwt.decode(header.removeprefix("Bearer "), secret, algorithms=["HS256"])
    except jwt.PyJWTError:
        return None
    return str(claims["sub"])


def watch_app(redis_url: str, stock: int, secret: str) -> web.Application:
    app = web.Application()
    client = Redis.from_url(redis_url, max_connections=512)

    async def setup(_: web.Application) -> None:
        await client.set("naive:stock", stock)
        await client.delete("naive:orders")

    async def buy(request: web.Request) -> web.Response:
        user = _user(request, secret)
        if user is None:
            return _refuse(401, "unauthorized")
        await request.read()
        for _ in range(TRIES):
            async with client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch("naive:stock")
                    left = int(await pipe.get("naive:stock") or 0)
                    if left < 1:
                        return _refuse(409, "sold_out")
                    pipe.multi()
                    pipe.decr("naive:stock")
                    pipe.rpush("naive:orders", user)
                    await pipe.execute()
                    return web.json_response({"status": "reserved"}, status=202)
                except redis_errors.WatchError:
                    continue  # someone else changed the stock first: optimistic retry
        return _refuse(409, "conflict")

    app.on_startup.append(setup)
    app.router.add_post("/api/v1/activities/{activity_id}/orders", buy)
    return app


def select_app(postgres_url: str, stock: int, secret: str) -> web.Application:
    app = web.Application()
    pools: list[asyncpg.Pool] = []

    async def setup(_: web.Application) -> None:
        pool = await asyncpg.create_pool(postgres_url, min_size=8, max_size=32)
        pools.append(pool)
        async with pool.acquire() as db:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS naive_stock (id TEXT PRIMARY KEY, left_ INT NOT NULL);"
                "CREATE TABLE IF NOT EXISTS naive_orders (id BIGSERIAL PRIMARY KEY, user_id TEXT);"
                "TRUNCATE naive_stock, naive_orders;"
            )
            await db.execute("INSERT INTO naive_stock VALUES ('a', $1)", stock)

    async def buy(request: web.Request) -> web.Response:
        user = _user(request, secret)
        if user is None:
            return _refuse(401, "unauthorized")
        await request.read()
        async with pools[0].acquire() as db, db.transaction():
            left = await db.fetchval("SELECT left_ FROM naive_stock WHERE id = 'a' FOR UPDATE")
            if left < 1:
                return _refuse(409, "sold_out")
            await db.execute("UPDATE naive_stock SET left_ = left_ - 1 WHERE id = 'a'")
            await db.execute("INSERT INTO naive_orders (user_id) VALUES ($1)", user)
        return web.json_response({"status": "reserved"}, status=202)

    app.on_startup.append(setup)
    app.router.add_post("/api/v1/activities/{activity_id}/orders", buy)
    return app


def main() -> None:
    port, design, url, stock, secret = sys.argv[1:6]
    app = (watch_app if design == "watch" else select_app)(url, int(stock), secret)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
