"""`/docs` works where the network has no internet: Swagger UI comes from the package itself,
under a CSP that names this origin only."""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser

import httpx

from phivault.web import docs


class _Assets(HTMLParser):
    """Every URL the page makes the browser load, with its integrity attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("src", "href"):
            url = values.get(name)
            if url is not None:
                self.found.append((url, values.get("integrity")))


def _sri(data: bytes) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


async def test_docs_page_loads_only_same_origin_assets(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    parser = _Assets()
    parser.feed(page.text)
    urls = [url for url, _ in parser.found]
    assert len(urls) == 3
    for url in urls:
        # Same origin: an absolute path, never a scheme or a protocol-relative //host.
        assert url.startswith("/") and not url.startswith("//"), url
    assert "cdn" not in page.text and "http://" not in page.text and "https://" not in page.text


async def test_docs_assets_answer_with_their_type_and_a_long_cache(
        client: httpx.AsyncClient) -> None:
    parser = _Assets()
    parser.feed((await client.get("/docs")).text)
    types = {".js": "text/javascript", ".css": "text/css"}
    for url, integrity in parser.found:
        answer = await client.get(url)
        assert answer.status_code == 200, url
        suffix = url[url.rindex("."):]
        assert answer.headers["content-type"].split(";")[0] == types[suffix]
        assert answer.content
        if url != "/docs/init.js":
            # The vendored files are the pinned release's bytes, which the page's SRI names.
            assert integrity == _sri(answer.content)
            assert "max-age=31536000" in answer.headers["cache-control"]
            assert docs.SWAGGER_VERSION in url


async def test_docs_csp_names_no_foreign_origin(client: httpx.AsyncClient) -> None:
    csp = (await client.get("/docs")).headers["content-security-policy"]
    sources = {source for directive in csp.split(";") for source in directive.split()[1:]}
    assert sources <= {"'self'", "'none'", "data:"}, sources
    assert re.search(r"script-src 'self'(;|$)", csp) and "unsafe" not in csp


def test_vendored_swagger_ships_with_its_licence() -> None:
    for name in ("LICENSE", "NOTICE"):
        assert docs.asset(name)
    assert b"Apache License" in docs.asset("LICENSE")
