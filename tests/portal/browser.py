"""A browser's side of the portal for in-process tests: cookies kept by the client, forms read
from the pages (their CSRF token), posts sent with the page's Origin as a browser sends them.
The real browser (Chromium, through Playwright) is in tests/portal/test_portal_browser.py."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import unescape

import httpx
import pyotp

from phivault.runtime import Runtime
from tests.conftest import client_for
from tests.factories import TestUser

ORIGIN = "https://testserver"
_HIDDEN = re.compile(r'<input type="hidden" name="csrf_token" value="([^"]*)">')


def csrf_of(page: httpx.Response) -> str:
    """The CSRF token of the first form of `page`."""
    found = _HIDDEN.search(page.text)
    assert found, f"no form with a CSRF token on {page.url}"
    return unescape(found.group(1))


async def post_form(client: httpx.AsyncClient, path: str, data: dict[str, str], *,
                    origin: str | None = ORIGIN) -> httpx.Response:
    headers = {"Origin": origin} if origin else {}
    return await client.post(path, data=data, headers=headers)


async def sign_in(client: httpx.AsyncClient, user: TestUser, *, secret: str | None = None,
                  next_path: str = "") -> httpx.Response:
    """Sign `user` in through the forms (with the TOTP code of `secret` when enrolled); the
    answer to the last form (a 303 to the page signed in to)."""
    page = await client.get("/portal/sign-in")
    assert page.status_code == 200
    answer = await post_form(client, "/portal/sign-in", {
        "email": user.email, "password": user.password, "csrf_token": csrf_of(page),
        "next": next_path})
    if secret is None:
        return answer
    assert answer.status_code == 303 and "/portal/sign-in/code" in answer.headers["location"]
    code_page = await client.get(answer.headers["location"])
    return await post_form(client, "/portal/sign-in/code", {
        # A step ahead (one step of drift is accepted): the current code may have just been
        # used to switch TOTP on, and a used code never works twice.
        "code": pyotp.TOTP(secret).at(time.time() + 30), "csrf_token": csrf_of(code_page),
        "next": next_path})


@asynccontextmanager
async def portal_of(runtime: Runtime, user: TestUser) -> AsyncIterator[httpx.AsyncClient]:
    """A browser signed in to the portal as `user`."""
    async with client_for(runtime) as browser:
        answer = await sign_in(browser, user)
        assert answer.status_code == 303, answer.text
        yield browser


async def submit(browser: httpx.AsyncClient, page: str, action: str,
                 data: dict[str, str]) -> httpx.Response:
    """Open `page` and post `data` to `action` with the page's CSRF token, as a browser."""
    opened = await browser.get(page)
    assert opened.status_code == 200, (page, opened.status_code)
    return await post_form(browser, action, {**data, "csrf_token": csrf_of(opened)})
