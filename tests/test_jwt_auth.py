"""JWTs, sans-I/O: the core's verifier (``core.jwt_auth``), key parsing (``core.jwt_keys``),
the handshake and ``refresh`` using them, and the server's key file reader."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import warnings
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.warnings import InsecureKeyLengthWarning

from magi_gateway.core import frames
from magi_gateway.core.auth import FailureThrottle, TokenVerifier
from magi_gateway.core.connection import ClientProtocol
from magi_gateway.core.errors import AuthenticationFailed
from magi_gateway.core.handshake import Admission, Admitted, Refusal
from magi_gateway.core.ids import AppId, ConnectionId
from magi_gateway.core.jwt_auth import JwtVerifier, is_jwt, mint, unverified_expiry
from magi_gateway.core.jwt_keys import KeyFileError, KeySet, parse_keys
from magi_gateway.core.protocol import Limits, Refresh, parse_client_frame
from magi_gateway.server.jwt_keys import KeyFile

NOW = 1_800_000_000.0
SECRET = "s3cret"
APP = "app"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def pem(private_key: Any) -> bytes:
    return bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": APP, "iat": int(NOW), "exp": int(NOW) + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def encode_hs(payload: dict[str, Any], secret: str, algorithm: str = "HS256") -> str:
    """An HS token; seed-scheme secrets are short, which PyJWT warns about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, secret, algorithm)


def hs(secret: str = SECRET, algorithm: str = "HS256", **overrides: Any) -> str:
    return encode_hs(claims(**overrides), secret, algorithm)


def signed(key: Any, algorithm: str, kid: str | None = None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**overrides), key, algorithm, headers=headers)


def verifier(keys: KeySet | None = None, **kwargs: Any) -> JwtVerifier:
    tokens = kwargs.pop("tokens", TokenVerifier(fixed_secret=SECRET))
    return JwtVerifier(tokens, lambda: keys or KeySet(), **kwargs)


def rejected(v: JwtVerifier, token: str, appid: str = APP, now: float = NOW) -> str:
    with pytest.raises(AuthenticationFailed) as failed:
        v.verify(token, appid, now)
    return str(failed.value)


# -- HS with the appid's secret -----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_hs_token_with_the_apps_secret_is_accepted(algorithm: str) -> None:
    result = verifier().verify(hs(algorithm=algorithm), APP, NOW)
    assert (result.appid, result.expires_at) == (APP, NOW + 300)


def test_sub_is_the_appid_when_the_client_gives_none() -> None:
    tokens = TokenVerifier(fixed_secret=None, app_secrets={"alpha": "sa", "beta": "sb"})
    token = encode_hs(claims(sub="beta"), "sb")
    assert verifier(tokens=tokens).verify(token, "", NOW).appid == "beta"
    # Claiming to be alpha: checked with alpha's secret, which did not sign it.
    assert rejected(verifier(tokens=tokens), token, appid="alpha") == "Signature verification failed"


def test_expired_token_is_refused_without_leeway() -> None:
    assert rejected(verifier(), hs(exp=int(NOW) - 1)) == "Token expired"
    assert rejected(verifier(), hs(exp=int(NOW))) == "Token expired"


def test_exp_is_required_and_must_be_a_number() -> None:
    assert "exp claim is required" in rejected(verifier(), hs(exp=None))
    assert "must be a number" in rejected(verifier(), hs(exp="tomorrow"))
    assert "must be a number" in rejected(verifier(), hs(exp=True))


def test_wrong_secret_is_refused() -> None:
    assert rejected(verifier(), encode_hs(claims(), "not-the-secret")) == ("Signature verification failed")


def test_unknown_appid_has_no_secret() -> None:
    tokens = TokenVerifier(fixed_secret=None, app_secrets={"alpha": "sa"})
    token = encode_hs(claims(sub="gamma"), "sa")
    rejected(verifier(tokens=tokens), token, appid="gamma")
    rejected(verifier(tokens=tokens), token, appid="")


def test_sub_must_match_the_appid_given() -> None:
    assert rejected(verifier(), hs(sub="other")) == "The sub claim is another appid"
    assert "sub claim" in rejected(verifier(), hs(sub=None))
    assert "sub claim" in rejected(verifier(), hs(sub=""), appid="")


def test_nbf_and_iat_allow_the_skew_and_no_more() -> None:
    v = verifier()  # TOKEN_SKEW_MINUTES=1: 60 s
    assert v.verify(hs(nbf=int(NOW) + 60, iat=int(NOW) + 60), APP, NOW).appid == APP
    assert rejected(v, hs(nbf=int(NOW) + 61)) == "Token not valid yet (nbf)"
    assert rejected(v, hs(iat=int(NOW) + 61)) == "Token not valid yet (iat)"
    strict = JwtVerifier(TokenVerifier(fixed_secret=SECRET, skew_minutes=0))
    assert rejected(strict, hs(nbf=int(NOW) + 1)) == "Token not valid yet (nbf)"


def test_audience_and_issuer_are_checked_when_configured() -> None:
    v = verifier(audience="magi", issuer="https://auth.example")
    good = hs(aud="magi", iss="https://auth.example")
    assert v.verify(good, APP, NOW).appid == APP
    assert v.verify(hs(aud=["other", "magi"], iss="https://auth.example"), APP, NOW).appid == APP
    assert rejected(v, hs(aud="other", iss="https://auth.example")) == "Token audience not accepted"
    assert rejected(v, hs(aud="magi", iss="https://evil.example")) == "Token issuer not accepted"
    assert rejected(v, hs(iss="https://auth.example")) == "The aud claim is required"
    assert rejected(v, hs(aud="magi")) == "The iss claim is required"
    # Not configured: not checked.
    assert verifier().verify(hs(aud="anything", iss="anyone"), APP, NOW).appid == APP


def test_alg_none_is_refused() -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert unsigned.endswith(".")
    assert is_jwt(unsigned)
    assert rejected(verifier(), unsigned) == "Token algorithm not accepted"
    assert rejected(verifier(parse_keys(pem(RSA_KEY))), unsigned) == "Token algorithm not accepted"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_hs256_signed_with_the_rs_public_key_is_refused() -> None:
    """Algorithm confusion: the public key (which anyone has) used as an HMAC secret."""
    public_pem = pem(RSA_KEY)
    keys = parse_keys(public_pem)
    head = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = _b64(orjson.dumps(claims()))
    mac = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{head}.{body}.{_b64(mac)}"
    assert rejected(verifier(keys), forged) == "Signature verification failed"
    # Even when FIXED_SECRET is unset (no HS secret at all) the key file is no HS secret.
    no_secret = verifier(keys, tokens=TokenVerifier(fixed_secret=None))
    rejected(no_secret, forged)
    # The same key verifies RS256 tokens.
    assert verifier(keys).verify(signed(RSA_KEY, "RS256"), APP, NOW).appid == APP


def test_malformed_and_oversized_tokens_are_refused() -> None:
    assert rejected(verifier(), "a.b.c") == "Malformed token"
    assert "longer than" in rejected(verifier(), "a." + "b" * 9000 + ".c")


# -- public keys: PEM and JWKS ------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [(RSA_KEY, "RS256"), (RSA_KEY, "PS256"), (EC_KEY, "ES256"), (ED_KEY, "EdDSA")],
)
def test_public_keys_from_pem(key: Any, algorithm: str) -> None:
    keys = parse_keys(pem(RSA_KEY) + b"\n" + pem(EC_KEY) + b"\n" + pem(ED_KEY))
    assert len(keys.keys) == 3
    assert verifier(keys).verify(signed(key, algorithm), "", NOW).appid == APP


def test_wrong_public_key_is_refused() -> None:
    keys = parse_keys(pem(RSA_KEY))
    assert rejected(verifier(keys), signed(OTHER_RSA_KEY, "RS256")) == "Signature verification failed"
    # An EC token against a file of RSA keys: no key of that type.
    assert rejected(verifier(keys), signed(EC_KEY, "ES256")) == "Signature verification failed"


def test_a_key_verifies_only_its_types_algorithms() -> None:
    keys = parse_keys(pem(EC_KEY))
    assert [sorted(k.algorithms) for k in keys.keys] == [["ES256"]]
    assert keys.candidates("ES384", None) == []
    assert keys.candidates("HS256", None) == []


def _jwks(*entries: tuple[Any, str, str | None]) -> bytes:
    keys = []
    for private_key, kid, alg in entries:
        public = private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        jwk["kid"] = kid
        if alg:
            jwk["alg"] = alg
        keys.append(jwk)
    return orjson.dumps({"keys": keys})


def test_jwks_keys_are_chosen_by_kid() -> None:
    keys = parse_keys(
        _jwks(
            (RSA_KEY, "rsa-1", "RS256"),
            (OTHER_RSA_KEY, "rsa-2", None),
            (EC_KEY, "ec", None),
            (ED_KEY, "ed", None),
        )
    )
    v = verifier(keys)
    assert v.verify(signed(RSA_KEY, "RS256", kid="rsa-1"), APP, NOW).appid == APP
    assert v.verify(signed(OTHER_RSA_KEY, "RS256", kid="rsa-2"), APP, NOW).appid == APP
    assert v.verify(signed(EC_KEY, "ES256", kid="ec"), APP, NOW).appid == APP
    assert v.verify(signed(ED_KEY, "EdDSA", kid="ed"), APP, NOW).appid == APP
    # Signed by one key, naming another's kid: only the named key is tried.
    rejected(v, signed(OTHER_RSA_KEY, "RS256", kid="rsa-1"))
    # A JWK's alg narrows its key to that one algorithm.
    rejected(v, signed(RSA_KEY, "RS512", kid="rsa-1"))
    assert v.verify(signed(OTHER_RSA_KEY, "RS512", kid="rsa-2"), APP, NOW).appid == APP
    # No kid: every key of the algorithm's type is tried.
    assert v.verify(signed(OTHER_RSA_KEY, "RS256"), APP, NOW).appid == APP


def test_app_secrets_restrict_public_key_tokens_too() -> None:
    keys = parse_keys(pem(RSA_KEY))
    tokens = TokenVerifier(fixed_secret=None, app_secrets={"alpha": "sa"})
    v = verifier(keys, tokens=tokens)
    assert v.verify(signed(RSA_KEY, "RS256", sub="alpha"), "", NOW).appid == "alpha"
    assert rejected(v, signed(RSA_KEY, "RS256", sub="gamma"), appid="") == "Unknown appid"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            RSA_KEY.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "private key",
        ),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "symmetric"),
        (b'{"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "c"}]}', "private key"),
        (_jwks((RSA_KEY, "r", "ES256")), "does not fit"),
        (b'{"keys": [{"kty": "RSA", "n": "AQAB"}]}', "not a usable JWK"),
        (b'{"nothing": 1}', "JWK Set"),
        (b"{not json", "invalid JSON"),
        (b"hello", "neither PEM nor a JWK Set"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", "unreadable PEM"),
    ],
)
def test_unusable_key_files_say_why(content: bytes, message: str) -> None:
    with pytest.raises(KeyFileError, match=message):
        parse_keys(content)


def test_encryption_keys_are_skipped() -> None:
    doc = orjson.loads(_jwks((RSA_KEY, "enc", None)))
    doc["keys"][0]["use"] = "enc"
    assert parse_keys(orjson.dumps(doc)).keys == ()


# -- the key file on disk -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_key_file_changed_on_disk_is_re_read(tmp_path: Path) -> None:
    path = tmp_path / "keys.pem"
    path.write_bytes(pem(RSA_KEY))
    clock = Clock()
    key_file = KeyFile(path, check_interval_s=1.0, clock=clock)
    v = JwtVerifier(TokenVerifier(fixed_secret=None), key_file.current)
    old, new = signed(RSA_KEY, "RS256"), signed(EC_KEY, "ES256")
    assert v.verify(old, APP, NOW).appid == APP
    rejected(v, new, appid=APP)
    # Replaced by rename, as editors and Kubernetes secret mounts do.
    (tmp_path / "keys.new").write_bytes(_jwks((EC_KEY, "ec", None)))
    os.replace(tmp_path / "keys.new", path)
    clock.now += 0.5  # within the interval: not looked at yet
    assert v.verify(old, APP, NOW).appid == APP
    clock.now += 1.0
    assert v.verify(new, APP, NOW).appid == APP
    rejected(v, old)
    # A broken edit keeps the last good keys.
    path.write_bytes(b"-----BEGIN PUBLIC KEY-----\ngarbage")
    clock.now += 2.0
    assert v.verify(new, APP, NOW).appid == APP
    path.unlink()
    clock.now += 2.0
    assert v.verify(new, APP, NOW).appid == APP


def test_an_unusable_key_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        KeyFile(tmp_path / "missing.pem")
    (tmp_path / "bad.pem").write_bytes(b"nothing")
    with pytest.raises(KeyFileError, match=r"bad\.pem"):
        KeyFile(tmp_path / "bad.pem")
    assert KeyFile(None).current().keys == ()


# -- the handshake and refresh --------------------------------------------------------------


def _admission() -> Admission:
    return Admission(TokenVerifier(SECRET), FailureThrottle(max_failures=10), ("*",))


def test_handshake_admits_a_jwt_with_its_appid_and_expiry() -> None:
    capacity_asked: list[str] = []

    def at_capacity(appid: AppId) -> bool:
        capacity_asked.append(appid)
        return False

    result = _admission().admit("1.2.3.4", "", hs(), NOW, accepting=True, at_capacity=at_capacity)
    assert result == Admitted(AppId(APP), NOW + 300)
    assert capacity_asked == [APP]  # the limit of the JWT's appid, not of the empty query one
    refused = _admission().admit(
        "1.2.3.4", APP, hs(exp=int(NOW) - 5), NOW, accepting=True, at_capacity=at_capacity
    )
    assert isinstance(refused, Refusal)
    assert (refused.code, refused.frame) == (4001, frames.AUTH_FAILED)
    assert _admission().check("1.2.3.4", APP, hs(), NOW, accepting=True, at_capacity=False) is None


def test_refresh_message_is_parsed() -> None:
    assert parse_client_frame(b'{"type": "refresh", "token": "a.b.c"}', Limits()) == Refresh("a.b.c")
    for bad in (
        b'{"type": "refresh"}',
        b'{"type": "refresh", "token": 5}',
        b'{"type": "refresh", "token": ""}',
    ):
        with pytest.raises(Exception, match="token"):
            parse_client_frame(bad, Limits())


def _client(expires_at: float | None = NOW + 300) -> ClientProtocol:
    return ClientProtocol(
        ConnectionId("c1"),
        AppId(APP),
        Limits(),
        jwt=JwtVerifier(TokenVerifier(SECRET)),
        expires_at=expires_at,
    )


def test_refresh_moves_the_expiry() -> None:
    client = _client()
    changes: list[float | None] = []
    client.on_expiry_change = lambda: changes.append(client.expires_at)
    frame = orjson.dumps({"type": "refresh", "token": hs(exp=int(NOW) + 900)})
    received = client.receive(frame, 0.0, NOW + 200)
    assert received.reply == b'{"type":"refreshed","expires_at":%d}' % (int(NOW) + 900)
    assert (received.command, client.expires_at, changes) == (None, NOW + 900, [NOW + 900])


@pytest.mark.parametrize(
    "token",
    [hs(sub="other"), hs(exp=int(NOW) - 1), encode_hs(claims(), "wrong-secret"), "0123456789"],
)
def test_a_bad_refresh_is_an_error_and_keeps_the_expiry(token: str) -> None:
    client = _client()
    received = client.receive(orjson.dumps({"type": "refresh", "token": token}), 0.0, NOW)
    assert received.reply is not None
    reply = orjson.loads(received.reply)
    assert reply["code"] == "auth_failed"
    assert reply["error"].startswith("Token refresh failed")
    assert client.expires_at == NOW + 300


def test_refresh_needs_the_wall_clock() -> None:
    received = _client().receive(orjson.dumps({"type": "refresh", "token": hs()}), 0.0)
    assert received.error == "auth_failed"


def test_mint_and_unverified_expiry() -> None:
    token = mint(APP, SECRET, now=NOW, ttl_s=60)
    assert verifier().verify(token, APP, NOW).expires_at == NOW + 60
    assert unverified_expiry(token) == NOW + 60
    assert unverified_expiry("0123456789") is None
    assert unverified_expiry("a.b.c") is None
    with pytest.raises(ValueError, match="HS256"):
        mint(APP, SECRET, now=NOW, ttl_s=60, algorithm="RS256")


def test_jwt_settings_empty_means_unset() -> None:
    from magi_gateway.settings import Settings

    settings = Settings(_env_file=None, jwt_keys_file="", jwt_audience="", jwt_issuer="")  # type: ignore[call-arg]
    assert (settings.jwt_keys_file, settings.jwt_audience, settings.jwt_issuer) == (None, None, None)
