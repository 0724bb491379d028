"""The `Content-Disposition` of a download (RFC 6266): the file's name, made safe to put in a
header and on the recipient's disk, as a plain ASCII `filename` for old clients and the name
itself as `filename*` (UTF-8, percent-encoded: RFC 8187).

An attachment's name is the uploader's choice and may be PHI: it goes into this header of the
one response that delivers the file (already to a caller who may read it), and nowhere else,
never into a log line or an audit event.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

MAX_NAME = 200
# The longest `filename*` value: a response's headers stay well within the 4 KiB buffer that a
# reverse proxy gives them by default (deploy/nginx.conf keeps nginx's).
MAX_ENCODED = 1024
# Unicode categories no file name needs: controls (CR, LF, NUL ...), format characters (the
# bidirectional overrides that make "cod.exe" read "exe.doc"), surrogates, private use,
# unassigned, and the line and paragraph separators.
_DROPPED = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# Path separators, and the characters Windows refuses in a name.
_RESERVED = re.compile(r'[\\/:*?"<>|]')
_SPACES = re.compile(r"\s+")
_NOT_PLAIN = re.compile(r"[^A-Za-z0-9._()-]+")
_EXTENSION = re.compile(r"[A-Za-z0-9]{1,16}")
# RFC 8187's attr-char, besides letters, digits and the unreserved "-._~" quote() keeps anyway.
_ATTR_CHARS = "!#$&+^`|"


def safe_name(name: str) -> str:
    """`name` without what a header or a file system would choke on: no controls or invisible
    formatting, no path (separators become "_"), no leading dot (no "..", no hidden file), no
    trailing dot or space, at most MAX_NAME characters (the extension kept). May be empty."""
    # Whitespace first (a tab or a line break is a space), then what is left of the controls.
    name = _SPACES.sub(" ", unicodedata.normalize("NFC", name))
    name = "".join(c for c in name if unicodedata.category(c) not in _DROPPED)
    name = _SPACES.sub(" ", _RESERVED.sub("_", name)).strip(" .")
    return _shortened(name, MAX_NAME)


def _shortened(name: str, length: int) -> str:
    """`name` cut to `length` characters, its extension kept."""
    if len(name) <= length:
        return name
    stem, dot, extension = name.rpartition(".")
    if dot and _EXTENSION.fullmatch(extension) and len(extension) < length - 1:
        return stem[:length - len(extension) - 1].rstrip(" .") + "." + extension
    return name[:length].rstrip(" .")


def _plain(text: str) -> str:
    """ASCII letters, digits and ._()- only: accents dropped from their letters, any other run
    of characters one "_"."""
    decomposed = unicodedata.normalize("NFKD", text)
    letters = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _NOT_PLAIN.sub("_", letters.replace(" ", "_"))


def ascii_name(name: str, fallback: str) -> str:
    """The plain ASCII form of a `safe_name` for `filename=`: "Müller befund.pdf" becomes
    "Muller_befund.pdf"; a name with no ASCII left becomes `fallback` with its extension."""
    stem, dot, extension = name.rpartition(".")
    if not (dot and _EXTENSION.fullmatch(extension)):
        stem, extension = name, ""
    plain_stem = _plain(stem).strip("._")
    plain_extension = _plain(extension) if _EXTENSION.fullmatch(_plain(extension)) else ""
    if not plain_stem:
        plain_stem = fallback
    return plain_stem + ("." + plain_extension if plain_extension else "")


def attachment_disposition(name: str, *, fallback: str = "download") -> str:
    """`attachment; filename="..."; filename*=UTF-8''...` for a file called `name` (whatever it
    holds), or `fallback` when nothing of it is usable."""
    safe = safe_name(name) or fallback
    encoded = quote(safe, safe=_ATTR_CHARS, encoding="utf-8")
    while len(encoded) > MAX_ENCODED:
        # Up to 12 bytes a character once encoded: keep the header within a proxy's buffer.
        safe = _shortened(safe, len(safe) - 1) or fallback
        encoded = quote(safe, safe=_ATTR_CHARS, encoding="utf-8")
    plain = ascii_name(safe, fallback)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{encoded}"
