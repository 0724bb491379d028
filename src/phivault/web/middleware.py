"""The outermost layer of every request, as one pure ASGI middleware.

It gives each request an id (returned as `X-Request-ID` and bound to every log line and audit
event), works out the client address (believing `X-Forwarded-For` only from trusted proxies),
caps the request body (413, also for chunked bodies without Content-Length) and its pace (408),
adds the security headers of SPEC §11 to every response, errors included, turns any unhandled
exception into a JSON 500 that carries only the request id, and writes one access-log line.

A JSON body is read here, whole, and must be JSON that every parser reads the same way (I-JSON,
RFC 7493): UTF-8 without a byte order mark, no name twice in one object, no NaN or Infinity;
and of a shape the API can take at a bounded cost: at most `JSON_MAX_CONTAINERS` objects and
arrays, `JSON_MAX_DEPTH` levels, `JSON_MAX_MEMBERS` members an object. Else 400
`malformed_json`, and the app never sees it. Python's parser alone takes UTF-16, keeps the last
of two equal names (a proxy or a client library may keep the first) and reads `1e999` as
infinity; a megabyte of unknown names cost a second of the event loop and a 6 MB answer.

A refusal sent while the request's body is still unread closes the connection (`Connection:
close`): the server would otherwise read on and throw away whatever the client sends, for as
long as it sends. So does a request with both Content-Length and Transfer-Encoding (RFC 9112
§6.3: a sign of request smuggling). The user agent is kept as UTF-8 text without controls.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import structlog
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
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
from phivault.web.errors import error_json, framework_error

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
# Far beyond any body of the API (its deepest nests three levels, its widest object a dozen
# members), far below what costs anything.
JSON_MAX_CONTAINERS = 1000
JSON_MAX_DEPTH = 32
JSON_MAX_MEMBERS = 1000
USER_AGENT_LENGTH = 256

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
# Pages that are not the JSON API bring their own CSP (the docs page loads Swagger UI, the
# portal's pages load their style sheet).
OWN_CSP_PREFIXES = ("/docs", "/portal")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class _NotIJson(ValueError):
    """The body is not JSON this API takes; the message is the answer's detail."""


_NOT_JSON = "The request body is not valid JSON."
_NOT_UTF8 = "The request body is not UTF-8 JSON (without a byte order mark)."
_NOT_A_NUMBER = "The request body holds NaN or Infinity, which are not JSON numbers."
_NAME_TWICE = "The request body repeats a name within one object."
_TOO_DEEP = f"The request body nests deeper than {JSON_MAX_DEPTH} levels."
_TOO_MANY = f"The request body holds more than {JSON_MAX_CONTAINERS} objects and arrays."
_TOO_WIDE = f"The request body has an object of more than {JSON_MAX_MEMBERS} members."
# A JSON string, to blank out before counting brackets. Possessive, and an unterminated string
# runs to the end of the body: no start is ever retried, so the scan is linear in the body
# (backtracking made a 48 KiB body of escaped quotes cost 7 s of the event loop).
_JSON_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
# Controls (C0, DEL, C1), line and paragraph separators, and what decoding replaced.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


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


def _members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > JSON_MAX_MEMBERS:
        raise _NotIJson(_TOO_WIDE)
    members = dict(pairs)
    if len(members) != len(pairs):
        raise _NotIJson(_NAME_TWICE)
    return members


def _no_constant(_: str) -> Any:
    raise _NotIJson(_NOT_A_NUMBER)


def _finite(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):  # 1e999: too large for a double
        raise _NotIJson(_NOT_A_NUMBER)
    return number


def check_json(body: bytes) -> None:
    """Raise `_NotIJson` unless `body` is JSON this API takes (see the module docstring).

    The shape is bounded before the parse, so the parse costs little: counting brackets is
    cheap, and only a body with many of them pays to have its strings (where a bracket is
    only text) taken out first."""
    try:
        text = body.decode("utf-8")  # strict: no overlong forms, no encoded surrogates
    except UnicodeDecodeError:
        raise _NotIJson(_NOT_UTF8) from None
    if text.startswith("\ufeff"):
        raise _NotIJson(_NOT_UTF8)
    bare = text
    if text.count("[") + text.count("{") > JSON_MAX_DEPTH:
        bare = _JSON_STRING.sub("", text)
        if bare.count("[") + bare.count("{") > JSON_MAX_CONTAINERS:
            raise _NotIJson(_TOO_MANY)
    try:
        json.loads(text, object_pairs_hook=_members, parse_constant=_no_constant,
                   parse_float=_finite)
    except _NotIJson:
        raise
    except RecursionError:
        raise _NotIJson(_TOO_DEEP) from None
    except ValueError:  # JSONDecodeError, and an integer of more than 4300 digits
        raise _NotIJson(_NOT_JSON) from None
    if bare is not text:  # enough brackets to nest too deep, and no more than 2,000
        steps = map(_BRACKET_STEP.__getitem__, _NOT_BRACKET.sub("", bare))
        if max(accumulate(steps), default=0) > JSON_MAX_DEPTH:
            raise _NotIJson(_TOO_DEEP)


def printable_header(value: str | None, length: int) -> str | None:
    """A header's value as text fit to store and show: its bytes read as UTF-8 (a malformed
    sequence becomes U+FFFD), control characters and line separators replaced by U+FFFD, at
    most `length` characters; None when empty."""
    if not value:
        return None
    text = value.encode("latin-1").decode("utf-8", "replace")
    return _UNPRINTABLE.sub("\ufffd", text)[:length] or None


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this type as JSON (`application/json`, `…+json`)."""
    kind = (content_type or "").partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/")
                                          and kind.endswith("+json"))


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
            user_agent=printable_header(headers.get("user-agent"), USER_AGENT_LENGTH),
        )
        token = set_request(ctx)
        actor_token = reset_actor()
        structlog.contextvars.bind_contextvars(request_id=ctx.request_id)
        declared = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        has_body = chunked or declared not in (None, "0")
        json_body = has_body and is_json(headers.get("content-type"))
        state: dict[str, Any] = {"started": False, "status": 500, "replaced": None,
                                 "body_done": False}
        # A JSON body is read whole before the app sees it: never more than MAX_BODY, even
        # on a route that streams larger uploads.
        limit = MAX_BODY if json_body else body_limit(path)

        def unread() -> bool:
            # A body left unread would still be read and thrown away, for as long as the
            # client sends it: the connection closes instead.
            return has_body and not state["body_done"]

        async def answer(response: JSONResponse) -> None:
            await _send_error(send, response, ctx.request_id, path, close=unread())
            state.update(started=True, status=response.status_code)

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                if state["replaced"] is not None:
                    # The body broke a limit while the app was reading it: whatever the app
                    # made of that (often a 400), the answer is ours.
                    await answer(_refusal(state["replaced"], ctx.request_id))
                    return
                state["started"] = True
                state["status"] = message["status"]
                _add_headers(message, ctx.request_id, path, close=unread())
            elif state["replaced"] is not None:
                return
            await send(message)

        try:
            well_formed = declared is not None and declared.isascii() and declared.isdigit() \
                and len(declared) <= 18
            if declared is not None and (not well_formed or int(declared) > limit):
                await answer(_refusal(413 if well_formed else 400, ctx.request_id))
                return
            if declared is not None and chunked:
                # Two framings: a proxy in front may have read the other one (smuggling).
                await answer(_refusal(400, ctx.request_id))
                return
            limited = _limited_receive(receive, limit, state)
            if json_body:
                body = await _read_body(limited)
                if body is None:
                    raise _ClientGone()
                try:
                    check_json(body)
                except _NotIJson as refused:
                    await answer(error_json(400, "malformed_json", str(refused)))
                    return
                limited = _replay(body, receive)
            await self.app(scope, limited, send_wrapped)
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
                await answer(_refusal(status, ctx.request_id))
        finally:
            elapsed = time.perf_counter() - started
            log.info("request", method=scope["method"], path=path, status=state["status"],
                     duration_ms=round(elapsed * 1000, 2), ip=ctx.ip)
            metrics.observe_request(scope["method"], metrics.route_of(scope),
                                    int(state["status"] or 0), elapsed)
            structlog.contextvars.unbind_contextvars("request_id")
            restore_actor(actor_token)
            reset_request(token)


class _ClientGone(Exception):
    pass


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body, through the limits of `_limited_receive`; None if the client left."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the body read already, then waits as the server's does."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _limited_receive(receive: Receive, limit: int, state: dict[str, Any]) -> Receive:
    received = 0
    deadline = time.monotonic() + BODY_GRACE + limit / BODY_MIN_RATE

    async def wrapped() -> Message:
        nonlocal received
        if state["body_done"]:
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
            state["body_done"] = not message.get("more_body", False)
        return message

    return wrapped


_SECURITY_RAW = [(name.encode(), value.encode()) for name, value in SECURITY_HEADERS]
_CSP = (b"content-security-policy", API_CSP.encode())
_NO_STORE = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
_ALWAYS_OURS = frozenset(name for name, _ in _SECURITY_RAW) | {b"x-request-id"}


def _add_headers(message: Message, request_id: str, path: str, *, close: bool = False) -> None:
    """Our headers on a response's start: they replace any the app set, except a page's own
    CSP (`OWN_CSP_PREFIXES`) and the portal's own cache-control. Built as one list (every
    response passes here: setting each header on `MutableHeaders` scanned the list each time)."""
    raw: list[tuple[bytes, bytes]] = list(message.get("headers", ()))
    names = {name.lower() for name, _ in raw}
    ours = set(_ALWAYS_OURS)
    added = [*_SECURITY_RAW, (b"x-request-id", request_id.encode())]
    if b"content-security-policy" not in names or not path.startswith(OWN_CSP_PREFIXES):
        ours.add(_CSP[0])
        added.append(_CSP)
    if path.startswith("/api/"):
        # API answers hold PHI, tokens or account data: no cache may keep them.
        ours.update(name for name, _ in _NO_STORE)
        added += _NO_STORE
    elif path.startswith("/portal") and b"cache-control" not in names:
        added.append(_NO_STORE[0])  # the portal's pages set it; its errors too
    if close:
        ours.add(b"connection")
        added.append((b"connection", b"close"))
    message["headers"] = [header for header in raw if header[0].lower() not in ours] + added


def _refusal(status: int, request_id: str) -> JSONResponse:
    return framework_error(status, request_id=request_id if status >= 500 else None)


async def _send_error(send: Send, response: JSONResponse, request_id: str, path: str, *,
                      close: bool) -> None:
    start: Message = {"type": "http.response.start", "status": response.status_code,
                      "headers": response.raw_headers}
    _add_headers(start, request_id, path, close=close)
    await send(start)
    await send({"type": "http.response.body", "body": response.body})
