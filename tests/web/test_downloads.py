"""`Content-Disposition` of downloads (RFC 6266): whatever a file is called, the header is one
line of plain ASCII, `filename` is a harmless ASCII name and `filename*` (RFC 8187) the name
itself, less what no name needs (controls, invisible formatting, paths)."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, unquote

from hypothesis import given
from hypothesis import strategies as st

from phivault.web.downloads import MAX_ENCODED, MAX_NAME, attachment_disposition, safe_name

HEADER = re.compile(
    r"attachment; filename=\"(?P<plain>[A-Za-z0-9._()-]{1,256})\"; "
    r"filename\*=UTF-8''(?P<encoded>[A-Za-z0-9!#$&+^`|~%._-]+)")


def _parts(header: str) -> tuple[str, str]:
    match = HEADER.fullmatch(header)
    assert match, header
    return match["plain"], unquote(match["encoded"], encoding="utf-8", errors="strict")


def _harmless(name: str) -> None:
    assert name and len(name) <= MAX_NAME
    assert not name.startswith((".", " ")) and not name.endswith((".", " "))
    assert not set(name) & set('/\\:*?"<>|')
    assert all(unicodedata.category(c) not in {"Cc", "Cf", "Cs", "Zl", "Zp"} for c in name)


HOSTILE = {
    'Befund "Müller".pdf': ("Befund__Muller.pdf", "Befund _Müller_.pdf"),
    "line\r\nSet-Cookie: a=1.pdf": ("line_Set-Cookie__a_1.pdf", "line Set-Cookie_ a=1.pdf"),
    "../../etc/passwd": ("etc_passwd", "_.._etc_passwd"),
    "..": ("attachment", "attachment"),
    "診断書.pdf": ("attachment.pdf", "診断書.pdf"),
    "scan\u202egnp.exe": ("scangnp.exe", "scangnp.exe"),
    ".bashrc": ("bashrc", "bashrc"),
    "résumé.pdf": ("resume.pdf", "résumé.pdf"),
    "scan.png": ("scan.png", "scan.png"),
}


def test_hostile_names_become_harmless() -> None:
    for name, (plain, exact) in HOSTILE.items():
        header = attachment_disposition(name, fallback="attachment")
        assert "\r" not in header and "\n" not in header
        assert _parts(header) == (plain, exact), name


def test_a_long_name_keeps_its_extension() -> None:
    plain, exact = _parts(attachment_disposition("a" * 1000 + ".pdf"))
    assert len(exact) == MAX_NAME and exact.endswith("a.pdf") and plain == exact


@given(st.text(max_size=400))
def test_any_name_gives_a_well_formed_header(name: str) -> None:
    header = attachment_disposition(name)
    assert header.isascii() and header.isprintable()
    plain, exact = _parts(header)
    _harmless(plain)
    _harmless(exact)
    whole = safe_name(name) or "download"
    if len(quote(whole, safe="")) <= MAX_ENCODED:
        assert exact == whole
    else:  # cut to fit, never grown
        assert len(exact) < len(whole)


def test_the_header_stays_short_whatever_the_name() -> None:
    """A name of 4-byte characters is 12 bytes a character once encoded: it is cut (its
    extension kept) so the headers fit a proxy's 4 KiB buffer."""
    header = attachment_disposition("\U0001F600" * 200 + ".pdf")
    assert len(header) <= MAX_ENCODED + 300
    plain, exact = _parts(header)
    assert plain == "download.pdf" and exact.endswith("\U0001F600.pdf")
