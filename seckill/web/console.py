"""The ops console: one static page (public), and the admin stream it reads the sale from.

The page holds no secret and no data: it asks for the admin token, keeps it in a JavaScript
variable (never storage, never a cookie, never a URL) and sends it as ``Authorization`` on
every admin API call, the live stream included. The stream is read with fetch(), not
EventSource, precisely because EventSource cannot send that header.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from seckill import resources
from seckill.errors import InvalidRequest
from seckill.web.state import SERVICES

routes = web.RouteTableDef()

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# the page loads only its own files and talks only to its own origin; nobody may frame it
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
# a console that goes quiet this long gets a comment line, so a dead peer is noticed
_KEEPALIVE_S = 5.0


def _assets(directory: Path) -> dict[str, tuple[bytes, str]]:
    """Every file of the console, read once at start: name -> (bytes, content type)."""
    return {
        path.name: (path.read_bytes(), _TYPES[path.suffix])
        for path in sorted(directory.iterdir())
        if path.suffix in _TYPES
    }


_FILES = _assets(resources.console_dir())


def _asset(name: str) -> web.Response:
    body, content_type = _FILES[name]
    answer = web.Response(body=body, content_type=content_type, charset="utf-8")
    answer.headers.update(_HEADERS)
    return answer


@routes.get("/admin/console", name="admin_console")
async def page(request: web.Request) -> web.Response:
    """The console page (static, public: every figure on it comes from the admin API)."""
    return _asset("console.html")


@routes.get(r"/admin/console/{name:[a-z]+\.(?:js|css)}", name="admin_console_asset")
async def asset(request: web.Request) -> web.Response:
    """The page's script and style sheet."""
    name = request.match_info["name"]
    if name not in _FILES:
        raise web.HTTPNotFound()
    return _asset(name)


@routes.get("/admin/v1/live", name="admin_live")
async def live(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: a snapshot of the sale every second (?events=N: stop after N)."""
    services = request.app[SERVICES]
    services.admin.check(request.headers.get("Authorization"))
    unknown = sorted(set(request.query) - {"events"})
    if unknown:
        raise InvalidRequest(f"unknown query parameter: {unknown[0]!r}")
    raw = request.query.get("events", "0")
    # digits only: int() would also take "1_000", " 5" or "+5"
    if not raw.isascii() or not raw.isdigit() or len(raw) > 5:
        raise InvalidRequest("events must be an integer in 0..86400")
    wanted = int(raw)
    if wanted > 86_400:
        raise InvalidRequest("events must be in 0..86400 (0: until the client goes away)")
    assert services.live is not None
    stream = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # a proxy in front must not hold the frames back
        }
    )
    await stream.prepare(request)
    viewer = services.live.watch()
    sent = 0
    try:
        # a draining gateway ends the stream: the console reconnects to another process
        while not services.draining and (not wanted or sent < wanted):
            frame = await viewer.next(_KEEPALIVE_S)
            await stream.write(frame if frame is not None else b": keepalive\n\n")
            sent += frame is not None
        await stream.write_eof()
    except ConnectionResetError:
        pass  # the console went away (a closed tab): nobody is left to answer
    finally:
        viewer.close()
    return stream
