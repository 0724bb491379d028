"""The client address: the socket's, unless the peer is a trusted proxy."""

from __future__ import annotations

import ipaddress

import pytest

from phivault.web.middleware import client_address

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
PROXIES = (ipaddress.ip_network("10.0.0.0/8"),)


def scope(peer: str, forwarded: str | list[str] | None) -> dict[str, object]:
    lines = [forwarded] if isinstance(forwarded, str) else forwarded or []
    headers = [(b"x-forwarded-for", line.encode()) for line in lines]
    return {"type": "http", "client": (peer, 5000), "headers": headers}


@pytest.mark.parametrize("peer, forwarded, trusted, expected", [
    # Nobody trusted: the header is ignored whatever it says.
    ("203.0.113.7", "198.51.100.1", (), "203.0.113.7"),
    ("127.0.0.1", "198.51.100.1", (), "127.0.0.1"),
    # An untrusted peer cannot forge its address.
    ("203.0.113.7", "198.51.100.1", LOOPBACK, "203.0.113.7"),
    # The trusted proxy's word is taken.
    ("127.0.0.1", "198.51.100.1", LOOPBACK, "198.51.100.1"),
    # A client-supplied prefix is skipped: the rightmost untrusted hop is the client.
    ("127.0.0.1", "6.6.6.6, 198.51.100.1", LOOPBACK, "198.51.100.1"),
    ("10.1.2.3", "6.6.6.6, 198.51.100.1, 10.9.9.9", PROXIES, "198.51.100.1"),
    # Only proxies in the chain: the peer.
    ("10.1.2.3", "10.9.9.9", PROXIES, "10.1.2.3"),
    # Garbage is not believed at all.
    ("127.0.0.1", "not-an-ip", LOOPBACK, "127.0.0.1"),
    ("127.0.0.1", "198.51.100.1, <script>", LOOPBACK, "127.0.0.1"),
    ("127.0.0.1", None, LOOPBACK, "127.0.0.1"),
    # Several header lines count together, in order (a proxy may append its own line).
    ("127.0.0.1", ["6.6.6.6", "198.51.100.9"], LOOPBACK, "198.51.100.9"),
    # Scoped IPv6 is refused; addresses are normalised (and so short enough to store).
    ("127.0.0.1", "fe80::1%" + "x" * 60, LOOPBACK, "127.0.0.1"),
    ("127.0.0.1", "2001:0db8:0000:0000:0000:0000:0000:0001", LOOPBACK, "2001:db8::1"),
])
def test_client_address(peer: str, forwarded: str | list[str] | None,
                        trusted: tuple[object, ...],
                        expected: str) -> None:
    assert client_address(scope(peer, forwarded), trusted) == expected  # type: ignore[arg-type]
