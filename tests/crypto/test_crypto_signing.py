"""JWT signing keys: raw seeds and PEM keys, RFC 7638 kids, JWKs, dev detection."""

from __future__ import annotations

import base64
import hashlib
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from phivault.crypto import KeyFormatError
from phivault.crypto.keys import KeyKind, b64url_encode, generate_key, generate_key_line
from phivault.crypto.signing import SigningKey, jwk_thumbprint, parse_jwt_keys

# RFC 8037 appendix A.1 (the Ed25519 key) and A.3 (its RFC 7638 thumbprint).
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _pem(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, password: bytes | None = None) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    ).decode()


def _rfc7638(x: str) -> str:
    canonical = '{"crv":"Ed25519","kty":"OKP","x":"' + x + '"}'
    return b64url_encode(hashlib.sha256(canonical.encode()).digest())


def test_raw_keys_keep_their_order_and_kids() -> None:
    first, second = generate_key(), generate_key()
    keys = parse_jwt_keys(f"jk-1:{b64url_encode(first)}, jk-2:{b64url_encode(second)}")
    assert [key.kid for key in keys] == ["jk-1", "jk-2"]
    raw = keys[0].private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    assert raw == first
    assert not keys[0].is_dev


def test_rfc8037_vector_as_pem_gets_the_rfc_thumbprint() -> None:
    key = Ed25519PrivateKey.from_private_bytes(_unb64(RFC8037_D))
    (signing,) = parse_jwt_keys(_pem(key))
    assert _rfc7638(RFC8037_X) == RFC8037_THUMBPRINT
    assert signing.kid == RFC8037_THUMBPRINT == jwk_thumbprint(key.public_key())
    assert signing.public_jwk() == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": RFC8037_X,
        "kid": RFC8037_THUMBPRINT,
        "alg": "EdDSA",
        "use": "sig",
    }


def test_several_pem_keys_with_or_without_commas() -> None:
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    for separator in ("", "\n", ",\n", " , "):
        keys = parse_jwt_keys(_pem(first) + separator + _pem(second))
        assert [key.kid for key in keys] == [
            _rfc7638(b64url_encode(k.public_key().public_bytes_raw())) for k in (first, second)
        ]


@pytest.mark.parametrize(
    ("make_text", "message"),
    [
        (lambda: _pem(ec.generate_private_key(ec.SECP256R1())), "not an Ed25519 key"),
        (lambda: _pem(Ed25519PrivateKey.generate(), b"secret"), "expected an unencrypted"),
        (
            lambda: (
                ec.generate_private_key(ec.SECP256R1())
                .private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
                .decode()
            ),
            "'EC PRIVATE KEY'",
        ),
        (lambda: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", "not a readable"),
        (lambda: _pem(Ed25519PrivateKey.generate())[:-30], "text outside the PEM blocks"),
        (
            lambda: _pem(Ed25519PrivateKey.generate()) + "," + generate_key_line(KeyKind.JWT),
            "text outside the PEM blocks",
        ),
        (lambda: "", "no key given"),
        (lambda: "jk:short", "not base64url"),
        (lambda: f"a:{b64url_encode(bytes(32))},a:{b64url_encode(bytes(32))}", "duplicate"),
        (lambda: _pem(k := Ed25519PrivateKey.generate()) + _pem(k), "duplicate key id"),
    ],
)
def test_bad_jwt_keys_are_refused(make_text: object, message: str) -> None:
    text = make_text()  # type: ignore[operator]
    with pytest.raises(KeyFormatError, match=message) as caught:
        parse_jwt_keys(text)
    assert "MC4CAQAw" not in str(caught.value)  # no PKCS#8 body in the message


def test_dev_keys_are_recognised() -> None:
    seed_marked = parse_jwt_keys(f"jk-1:{b64url_encode(generate_key(dev=True))}")[0]
    id_marked = parse_jwt_keys(f"dev-jk-1:{b64url_encode(generate_key())}")[0]
    generated = parse_jwt_keys(generate_key_line(KeyKind.JWT, dev=True))[0]
    pem = parse_jwt_keys(_pem(Ed25519PrivateKey.from_private_bytes(generate_key(dev=True))))[0]
    assert seed_marked.is_dev and id_marked.is_dev and generated.is_dev and pem.is_dev
    assert not parse_jwt_keys(generate_key_line(KeyKind.JWT))[0].is_dev


def test_keys_sign_tokens_that_pyjwt_verifies_with_the_jwk() -> None:
    (key,) = parse_jwt_keys(generate_key_line(KeyKind.JWT))
    token = jwt.encode({"sub": "u"}, key.private_key, algorithm="EdDSA", headers={"kid": key.kid})
    public = jwt.PyJWK.from_json(json.dumps(key.public_jwk()))
    assert jwt.get_unverified_header(token)["kid"] == key.kid
    assert jwt.decode(token, public, algorithms=["EdDSA"]) == {"sub": "u"}
    assert jwt.decode(token, key.public_key, algorithms=["EdDSA"]) == {"sub": "u"}


def test_signing_key_repr_hides_the_private_key() -> None:
    seed = generate_key()
    key = parse_jwt_keys(f"jk-1:{b64url_encode(seed)}")[0]
    assert isinstance(key, SigningKey)
    assert "private_key" not in repr(key)
    assert b64url_encode(seed) not in repr(key) and seed.hex() not in repr(key)
