"""Public keys that verify RS/PS/ES/EdDSA JWTs, sans-I/O: bytes in, a ``KeySet`` out.

``JWT_KEYS_FILE`` holds either PEM (any number of public keys or certificates) or a JWK
Set (``{"keys": [...]}``, or one JWK). Reading the file is the server's job
(``server.jwt_keys``); this module only parses what it read.

A key verifies only the algorithms of its own type, never one named by a token alone:
an RSA key RS256/384/512 and PS256/384/512, an EC key the ES algorithm of its curve,
an Ed25519/Ed448 key EdDSA; a JWK's ``alg`` narrows that to one. Private keys and
symmetric (``oct``) keys are refused: HS tokens are checked with the appid's secret only,
so a public key can never serve as an HMAC secret (algorithm confusion).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK, PyJWTError

__all__ = ["ASYMMETRIC_ALGORITHMS", "EMPTY_KEYS", "KeyFileError", "KeySet", "PublicKey", "parse_keys"]

_RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_EDDSA = frozenset({"EdDSA"})
#: Every algorithm a key from the key file may verify.
ASYMMETRIC_ALGORITHMS = _RSA | frozenset(_EC_BY_CURVE.values()) | _EDDSA
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.DOTALL)
#: Keys one file may hold (a bound: a JWKS is usually a handful).
MAX_KEYS = 256


class KeyFileError(ValueError):
    """The key file's content is not usable (its text says why, for the operator)."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    """One verification key and the algorithms it may verify."""

    key: Any  # a cryptography public key object
    algorithms: frozenset[str]
    kid: str | None = None


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys of the key file."""

    keys: tuple[PublicKey, ...] = ()

    def candidates(self, algorithm: str, kid: str | None) -> list[PublicKey]:
        """Keys that may verify a token signed with ``algorithm`` naming ``kid``.

        A token naming a ``kid`` is checked with the key of that id; when no key has
        it, with the keys that have no id (PEM keys).
        """
        usable = [k for k in self.keys if algorithm in k.algorithms]
        if kid is None:
            return usable
        return [k for k in usable if k.kid == kid] or [k for k in usable if k.kid is None]


EMPTY_KEYS = KeySet()


def algorithms_of(key: Any) -> frozenset[str]:
    """The algorithms a public key of this type may verify (empty: unsupported type)."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA
    if isinstance(key, ec.EllipticCurvePublicKey):
        name = _EC_BY_CURVE.get(key.curve.name)
        return frozenset({name}) if name else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return _EDDSA
    return frozenset()


def parse_keys(data: bytes) -> KeySet:
    """Parse PEM or a JWK Set; raise ``KeyFileError`` saying what is wrong."""
    text = data.strip()
    if not text:
        return EMPTY_KEYS
    keys = _parse_jwks(text) if text.startswith(b"{") else _parse_pem(text)
    if len(keys) > MAX_KEYS:
        raise KeyFileError(f"more than {MAX_KEYS} keys")
    return KeySet(tuple(keys))


def _parse_pem(text: bytes) -> list[PublicKey]:
    keys: list[PublicKey] = []
    for match in _PEM_BLOCK.finditer(text):
        label = match.group(1).decode()
        if "PRIVATE" in label:
            raise KeyFileError("holds a private key; give the public key only")
        try:
            if label == "CERTIFICATE":
                key: Any = x509.load_pem_x509_certificate(match.group(0)).public_key()
            elif label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
                key = load_pem_public_key(match.group(0))
            else:
                raise KeyFileError(f"unsupported PEM block: {label}")
        except ValueError as exc:
            if isinstance(exc, KeyFileError):
                raise
            raise KeyFileError(f"unreadable PEM block ({label})") from exc
        keys.append(PublicKey(key, _usable(key, label)))
    if not keys:
        raise KeyFileError("neither PEM nor a JWK Set")
    return keys


def _parse_jwks(text: bytes) -> list[PublicKey]:
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise KeyFileError("invalid JSON") from exc
    if isinstance(document, dict) and isinstance(document.get("keys"), list):
        entries: list[Any] = document["keys"]
    elif isinstance(document, dict) and "kty" in document:
        entries = [document]
    else:
        raise KeyFileError('a JWK Set must be {"keys": [...]}')
    keys: list[PublicKey] = []
    for index, jwk in enumerate(entries):
        if not isinstance(jwk, dict):
            raise KeyFileError(f"key {index} is not an object")
        if jwk.get("use") == "enc":
            continue  # an encryption key verifies nothing
        if jwk.get("kty") == "oct":
            raise KeyFileError(f"key {index} is symmetric; HS tokens are checked with the appid's secret")
        if "d" in jwk:
            raise KeyFileError(f"key {index} is a private key; give the public key only")
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise KeyFileError(f"key {index}: kid must be a string")
        try:
            # Its key type decides the algorithms (below), not its alg: read it without.
            key = PyJWK({k: v for k, v in jwk.items() if k != "alg"}).key
        except PyJWTError as exc:
            raise KeyFileError(f"key {index} is not a usable JWK") from exc
        algorithms = _usable(key, f"key {index}")
        alg = jwk.get("alg")
        if alg is not None:
            if not isinstance(alg, str) or alg not in algorithms:
                raise KeyFileError(f"key {index}: alg {alg!r} does not fit its key type")
            algorithms = frozenset({alg})
        keys.append(PublicKey(key, algorithms, kid))
    return keys


def _usable(key: Any, what: str) -> frozenset[str]:
    algorithms = algorithms_of(key)
    if not algorithms:
        raise KeyFileError(f"{what}: unsupported key type (RSA, EC P-256/384/521, Ed25519, Ed448)")
    return algorithms
