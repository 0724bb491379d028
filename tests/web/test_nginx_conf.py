"""Review finding (issue 10, LOW): `deploy/nginx.conf` must let through what phivault accepts. Its
attachment upload limit was `25m`, exactly the largest file phivault takes, so a 25 MiB file
plus its multipart framing (boundaries, part headers) was refused by the proxy with an HTML 413.
The proxy's limits must be at least phivault's own (web/middleware.py), so that phivault
decides, with its JSON answer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from phivault.clinical.attachments import MAX_FILE_BYTES
from phivault.web.middleware import MAX_BODY, MAX_UPLOAD, body_limit

CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
# A multipart body is the file plus a boundary line before and after it and the part's headers
# (Content-Disposition with a filename of up to 255 characters, Content-Type): well under 4 KiB.
FRAMING = 4 * 1024


def nginx_size(text: str) -> int:
    """An nginx size (`1024`, `8k`, `26m`) in bytes."""
    match = re.fullmatch(r"(\d+)([kmg]?)", text.strip().lower())
    assert match, f"not an nginx size: {text!r}"
    return int(match.group(1)) * UNITS[match.group(2)]


def server_blocks() -> list[str]:
    """The text of each `server { ... }` block, comments removed."""
    text = "\n".join(line.split("#", 1)[0] for line in CONF.read_text().splitlines())
    blocks, depth, start = [], 0, None
    for match in re.finditer(r"server\s*\{|\{|\}", text):
        if match.group().startswith("server") and depth == 0:
            start, depth = match.end(), 1
        elif match.group() == "{" and start is not None:
            depth += 1
        elif match.group() == "}" and start is not None:
            depth -= 1
            if depth == 0:
                blocks.append(text[start:match.start()])
                start = None
    return blocks


def tls_server() -> str:
    (block,) = [b for b in server_blocks() if "listen 443" in b]
    return block


def locations(block: str) -> dict[str, str]:
    """`location` pattern -> its body (locations here do not nest)."""
    return {m.group(1).strip(): m.group(2)
            for m in re.finditer(r"location\s+([^{]+)\{([^}]*)\}", block)}


def body_size(text: str) -> int:
    (size,) = re.findall(r"^\s*client_max_body_size\s+(\S+);", text, re.MULTILINE)
    return nginx_size(size)


def test_the_upload_location_takes_25_mib_plus_its_multipart_framing() -> None:
    (upload,) = [body for pattern, body in locations(tls_server()).items()
                 if "attachments" in pattern]
    limit = body_size(upload)
    assert limit >= 25 * 1024**2 + FRAMING
    # ... and at least everything phivault itself accepts on that route, so that phivault (not
    # the proxy's HTML error page) answers an oversized upload.
    assert MAX_FILE_BYTES == 25 * 1024**2
    assert limit >= MAX_UPLOAD


def test_other_locations_take_phivaults_own_body_limit() -> None:
    block = tls_server()
    outside = re.sub(r"location\s+[^{]+\{[^}]*\}", "", block)
    assert body_size(outside) >= MAX_BODY


@pytest.mark.parametrize(("path", "routed"), [
    ("/api/v1/patients/6a1d0f3e-8d5c-4a7e-9a53-0f1c2b3d4e5f/attachments", True),
    ("/api/v1/patients/6a1d0f3e-8d5c-4a7e-9a53-0f1c2b3d4e5f/records", False),
    ("/api/v1/attachments/6a1d0f3e-8d5c-4a7e-9a53-0f1c2b3d4e5f", False),
])
def test_the_upload_location_is_the_route_phivault_gives_the_larger_limit(
        path: str, routed: bool) -> None:
    (pattern,) = [p for p in locations(tls_server()) if "attachments" in p]
    regex = pattern.removeprefix("~").strip()
    assert bool(re.match(regex, path)) is routed
    assert (body_limit(path) == MAX_UPLOAD) is routed


@pytest.mark.parametrize(("text", "size"), [("1m", 1024**2), ("26m", 26 * 1024**2),
                                            ("25664k", 25 * 1024**2 + 64 * 1024),
                                            ("1024", 1024)])
def test_nginx_sizes_are_read_in_binary_units(text: str, size: int) -> None:
    assert nginx_size(text) == size
