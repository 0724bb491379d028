"""The outermost layer of every request, as one pure ASGI middleware.

It gives each request an id (returned as `X-Request-ID` and bound to every log line and audit
event), works out the client address (believing `X-Forwarded-For` only from trusted proxies),
caps the request body (413, also for chunked bodies without Content-Length) and its pace (408),
adds the security headers of SPEC §11 to every response, errors included, turns any unhandled
exception into a JSON 500 that carries only the request id, and writes one access-log line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Sequence
from typing import Any

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phivault.observability import get_logger
from phivault.ops import metrics
from phivault.request_context import (
    RequestContext,
    new_request_id,
    reset_actor,
    reset_request,
    restore_actor,
    set_request,
)
from phivault.web.errors import framework_error

log = get_logger("phivault.access")

MAX_BODY = 1024 * 1024
# 25 MiB of file, plus room for the multipart framing around it.
MAX_UPLOAD = 25 * 1024 * 1024 + 64 * 1024
# Routes that take uploads get the larger cap; everything else gets MAX_BODY.
UPLOAD_ROUTES = (re.compile(r"^/api/v1/patients/[^/]+/attachments/?$"),)
BODY_CHUNK_TIMEOUT = 30.0
# The whole body must arrive within a deadline that allows a slow but honest client
# (64 KiB/s) plus a margin: about 46 s for 1 MiB, 7 minutes for 25 MiB.
BODY_MIN_RATE = 64 * 1024
BODY_GRACE = 30.0

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
SECURITY_HEADERS = (
    ("strict-transport-security", "max-age=31536000; includeSubDomains"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("permissions-policy", "camera=(), microphone=(), geolocation=()"),
)
# Pages that are not the JSON API bring their own CSP (the docs page loads Swagger UI).
OWN_CSP_PREFIXES = ("/docs",)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


def client_address(scope: Scope, trusted: Sequence[Network]) -> str | None:
    """The socket's peer, or, when that peer is a trusted proxy, the first address of
    `X-Forwarded-For` counted from the right that is not itself a trusted proxy."""
    peer = scope.get("client")
    address: str | None = str(peer[0]) if peer else None
    if not trusted or address is None or not _is_trusted(address, trusted):
        return address
    # Every X-Forwarded-For line counts (a proxy may append its own line), in order.
    lines = Headers(scope=scope).getlist("x-forwarded-for")
    hops = [h.strip() for line in lines for h in line.split(",")]
    if not hops:
        return address
    for hop in reversed(hops):
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            return address  # A malformed chain is not believed at all.
        if getattr(ip, "scope_id", None):
            return address  # Scoped IPv6 (fe80::1%eth0) is no client address.
        if not _is_trusted(str(ip), trusted):
            return str(ip)  # Normalised: at most 39 characters.
    return address


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def body_limit(path: str) -> int:
    return MAX_UPLOAD if any(p.match(path) for p in UPLOAD_ROUTES) else MAX_BODY


class RequestGuardMiddleware:
    def __init__(self, app: ASGIApp, trusted_proxies: Sequence[Network] = ()) -> None:
        self.app = app
        self.trusted = tuple(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        path: str = scope["path"]
        ctx = RequestContext(
            request_id=new_request_id(),
            ip=client_address(scope, self.trusted),
            user_agent=(headers.get("user-agent") or "")[:256] or None,
        )
        token = set_request(ctx)
        actor_token = reset_actor()
        structlog.contextvars.bind_contextvars(request_id=ctx.request_id)
        state: dict[str, Any] = {"started": False, "status": 500, "replaced": None}
        limit = body_limit(path)

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                if state["replaced"] is not None:
                    # The body broke a limit while the app was reading it: whatever the app
                    # made of that (often a 400), the answer is ours.
                    await _send_json(send, state["replaced"], ctx.request_id, path)
                    state["started"] = True
                    state["status"] = state["replaced"]
                    return
                state["started"] = True
                state["status"] = message["status"]
                _add_headers(message, ctx.request_id, path)
            elif state["replaced"] is not None:
                return
            await send(message)

        declared = headers.get("content-length")
        try:
            well_formed = declared is not None and declared.isascii() and declared.isdigit() \
                and len(declared) <= 18
            if declared is not None and (not well_formed or int(declared) > limit):
                status = 413 if well_formed else 400
                await _send_json(send, status, ctx.request_id, path)
                state.update(started=True, status=status)
                return
            await self.app(scope, _limited_receive(receive, limit, state), send_wrapped)
        except Exception as exc:
            if state.get("gone"):
                # The client went away while sending its body (the app saw ClientDisconnect):
                # nobody to answer, and nothing wrong with the server. Logged as nginx does.
                state["status"] = 499
                return
            status = state["replaced"] or 500
            if status == 500:
                # Only the type: messages of database errors can hold bound values.
                log.error("unhandled_error", error_type=type(exc).__name__)
            if not state["started"]:
                await _send_json(send, status, ctx.request_id, path)
                state.update(started=True, status=status)
        finally:
            elapsed = time.perf_counter() - started
            log.info("request", method=scope["method"], path=path, status=state["status"],
                     duration_ms=round(elapsed * 1000, 2), ip=ctx.ip)
            metrics.observe_request(scope["method"], metrics.route_of(scope),
                                    int(state["status"] or 0), elapsed)
            structlog.contextvars.unbind_contextvars("request_id")
            restore_actor(actor_token)
            reset_request(token)


def _limited_receive(receive: Receive, limit: int, state: dict[str, Any]) -> Receive:
    received = 0
    body_done = False
    deadline = time.monotonic() + BODY_GRACE + limit / BODY_MIN_RATE

    async def wrapped() -> Message:
        nonlocal received, body_done
        if body_done:
            # After the body, receive() only waits for the client to go away (streaming
            # responses listen for that for as long as they stream): no deadline then.
            return await receive()
        timeout = min(BODY_CHUNK_TIMEOUT, deadline - time.monotonic())
        try:
            if timeout <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(receive(), timeout=timeout)
        except TimeoutError:
            state["replaced"] = 408
            raise _BodyTooSlow() from None
        if message["type"] == "http.disconnect":
            state["gone"] = True
        elif message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                state["replaced"] = 413
                raise _BodyTooLarge()
            body_done = not message.get("more_body", False)
        return message

    return wrapped


def _add_headers(message: Message, request_id: str, path: str) -> None:
    headers = MutableHeaders(scope=message)
    for name, value in SECURITY_HEADERS:
        headers[name] = value
    if "content-security-policy" not in headers or not path.startswith(OWN_CSP_PREFIXES):
        headers["content-security-policy"] = API_CSP
    headers["x-request-id"] = request_id
    if path.startswith("/api/"):
        # API answers hold PHI, tokens or account data: no cache may keep them.
        headers["cache-control"] = "no-store"
        headers["pragma"] = "no-cache"


async def _send_json(send: Send, status: int, request_id: str, path: str) -> None:
    response = framework_error(status, request_id=request_id if status >= 500 else None)
    start: Message = {"type": "http.response.start", "status": status,
                      "headers": response.raw_headers}
    _add_headers(start, request_id, path)
    await send(start)
    await send({"type": "http.response.body", "body": response.body})
