"""EARs as a relying party sees them: standard claims, verified by a stock JOSE library.

The relying party here is joserfc, a JOSE implementation that shares no code with
PyJWT (which the REM-S signs with): if it accepts the token against the published
JWK set, any standard verifier will. The attacks are the classic JWT ones: another
key, ``alg: none``, HS256 keyed with the public key, a lapsed or re-issued token, a
token of another kind signed with the same key.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt as jose_jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import KeySet

from vims.rems import ear, jws

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())
ISSUER = "https://rems.lab.example:8080"
VECTOR = {"instance-identity": 2, "executables": 96, "configuration": 2, "hardware": 2}
CHECKS = {"kernel.text": "pass", "kernel.syscall_table": "fail", "process.hidden": "stale",
          "behaviour.trace": "not_applicable", "kernel.idt": "error"}


def nonce() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()


def issue(key: ec.EllipticCurvePrivateKey = KEY, **over: Any) -> str:
    now = int(time.time())
    args: dict[str, Any] = {"status": "contraindicated", "vector": VECTOR,
                            "policy_id": "policy:lab@3", "checks": CHECKS, "key": key,
                            "iat": now, "exp": now + 30, "issuer": ISSUER}
    args.update(over)
    return ear.issue("cvm1", **args)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# ------------------------------------------------------------------ a stock verifier
def test_a_stock_jose_library_verifies_the_ear_against_the_published_jwks() -> None:
    n = nonce()
    token = issue(nonce=n)
    keys = KeySet.import_key_set(ear.jwks(KEY.public_key()))  # what /.well-known serves
    verified = jose_jwt.decode(token, keys, algorithms=["ES256"])
    jose_jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": ISSUER}, exp={"essential": True},
        iat={"essential": True}).validate(verified.claims)
    assert verified.header["alg"] == "ES256"
    assert verified.header["kid"] == ear.jwks(KEY.public_key())["keys"][0]["kid"]
    assert verified.header["typ"] == "eat+jwt"  # RFC 9782 media type, explicit typing
    claims = verified.claims
    # draft-ietf-rats-ear-04 claim names and profile
    assert claims["eat_profile"] == "tag:ietf.org,2026:rats/ear#04" == ear.EAR_PROFILE
    assert set(claims["ear_verifier_id"]) == {"developer", "build"}
    assert claims["ear_status"] == "contraindicated"  # overall, no better than any submod
    assert claims["eat_nonce"] == n  # top level, as in EAT
    assert isinstance(claims["iat"], int)
    assert isinstance(claims["exp"], int)
    sub = claims["submods"]["cvm1"]
    assert sub["ear_status"] == "contraindicated"
    assert sub["ear_trustworthiness_vector"] == VECTOR
    assert sub["ear_appraisal_policy_ids"] == ["policy:lab@3"]
    assert sub["vims_checks"] == CHECKS
    assert "eat_nonce" not in sub  # the appraisal nonce is the evidence's, not ours
    assert "vims_deployment" not in claims


def test_a_stock_jose_library_refuses_an_ear_from_another_key() -> None:
    keys = KeySet.import_key_set(ear.jwks(KEY.public_key()))
    forged = issue(OTHER)
    # Same kid as the real key (an attacker copies it from the JWKS): only the signature
    # can tell, and it does.
    head, body, sig = forged.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=="))
    header["kid"] = ear.key_id(KEY.public_key())
    with pytest.raises(BadSignatureError):
        jose_jwt.decode(f"{b64(header)}.{body}.{sig}", keys, algorithms=["ES256"])


def test_the_jwks_is_a_public_p256_key_with_its_kid() -> None:
    (jwk,) = ear.jwks(KEY.public_key())["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")
    assert jwk["kid"] == ear.key_id(KEY.public_key())
    assert "d" not in jwk
    assert jws.keys_from_jwks(ear.jwks(KEY.public_key())) == {
        jwk["kid"]: KEY.public_key()}


def test_insecure_lab_ears_say_so() -> None:
    claims = ear.verify(issue(insecure_lab=True), KEY.public_key())
    assert claims["vims_deployment"] == {"insecure_lab": True}  # an extension is a map


def test_an_empty_vector_is_left_out() -> None:
    """The draft's trustworthiness vector is non-empty when present."""
    sub = ear.verify(issue(status="none", vector={}), KEY.public_key())["submods"]["cvm1"]
    assert "ear_trustworthiness_vector" not in sub
    assert sub["ear_status"] == "none"


# ------------------------------------------------------------------------ ear.verify
def test_verify_checks_issuer_and_nonce_when_asked() -> None:
    n = nonce()
    claims = ear.verify(issue(nonce=n), KEY.public_key(), issuer=ISSUER, nonce=n)
    assert claims["submods"]["cvm1"]["ear_status"] == "contraindicated"
    with pytest.raises(jwt.InvalidIssuerError):
        ear.verify(issue(issuer="https://evil.example"), KEY.public_key(), issuer=ISSUER)
    with pytest.raises(jwt.InvalidTokenError, match="nonce"):
        ear.verify(issue(nonce=nonce()), KEY.public_key(), nonce=n)
    with pytest.raises(jwt.InvalidTokenError, match="nonce"):  # asked for, not echoed
        ear.verify(issue(), KEY.public_key(), nonce=n)


def test_verify_refuses_another_key() -> None:
    with pytest.raises(jwt.InvalidSignatureError):
        ear.verify(issue(OTHER), KEY.public_key())


def test_verify_refuses_alg_none() -> None:
    good = ear.verify(issue(), KEY.public_key())
    unsigned = jwt.encode(good, None, algorithm="none", headers={"typ": "eat+jwt"})
    with pytest.raises(jwt.InvalidAlgorithmError):
        ear.verify(unsigned, KEY.public_key())
    stripped = ".".join(issue().split(".")[:2]) + "."  # a real token, signature cut off
    with pytest.raises(jwt.InvalidTokenError):
        ear.verify(stripped, KEY.public_key())


def test_verify_refuses_hs256_keyed_with_the_public_key() -> None:
    """The key confusion attack: the public key's PEM used as an HMAC secret."""
    pem = KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = ear.verify(issue(), KEY.public_key())
    header = {"alg": "HS256", "typ": "eat+jwt", "kid": ear.key_id(KEY.public_key())}
    signing_input = f"{b64(header)}.{b64(claims)}"
    import hashlib
    import hmac
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    with pytest.raises(jwt.InvalidAlgorithmError):
        ear.verify(forged, KEY.public_key())


def test_verify_refuses_expired_and_undated_ears() -> None:
    now = int(time.time())
    with pytest.raises(jwt.ExpiredSignatureError):
        ear.verify(issue(iat=now - 100, exp=now - 70), KEY.public_key())
    for missing in ("exp", "iat"):
        claims = ear.verify(issue(), KEY.public_key())
        del claims[missing]
        token = jwt.encode(claims, KEY, algorithm="ES256",
                           headers={"typ": "eat+jwt", "kid": ear.key_id(KEY.public_key())})
        with pytest.raises(jwt.MissingRequiredClaimError):
            ear.verify(token, KEY.public_key())


def test_verify_refuses_floating_point_times() -> None:
    """EAR: a floating-point exp MUST be treated as an error."""
    claims = ear.verify(issue(), KEY.public_key())
    claims["exp"] = claims["exp"] + 0.5
    token = jwt.encode(claims, KEY, algorithm="ES256",
                       headers={"typ": "eat+jwt", "kid": ear.key_id(KEY.public_key())})
    with pytest.raises(jwt.InvalidTokenError, match="integer"):
        ear.verify(token, KEY.public_key())


def test_verify_refuses_other_tokens_signed_with_the_rems_key() -> None:
    """A webhook or audit checkpoint is signed by the same key; it is not an EAR."""
    now = int(time.time())
    other = jws.sign({"iss": ISSUER, "iat": now, "exp": now + 30, "cvm": "cvm1",
                      "status": "affirming"}, KEY, typ="vims-webhook+jwt")
    with pytest.raises(jwt.InvalidTokenError):
        ear.verify(other, KEY.public_key())
    claims = ear.verify(issue(), KEY.public_key())
    retyped = jws.sign(claims, KEY, typ="vims-webhook+jwt")
    with pytest.raises(jwt.InvalidTokenError, match="typ"):
        ear.verify(retyped, KEY.public_key())
    claims["eat_profile"] = "tag:github.com,2023:veraison/ear"  # the old claim set
    with pytest.raises(jwt.InvalidTokenError, match="eat_profile"):
        ear.verify(jws.sign(claims, KEY, typ="eat+jwt"), KEY.public_key())


def test_verify_refuses_a_tampered_body() -> None:
    head, body, sig = issue(status="affirming", vector={"executables": 2}).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["submods"]["cvm1"]["vims_checks"] = {"kernel.text": "pass"}
    with pytest.raises(jwt.InvalidSignatureError):
        ear.verify(f"{head}.{b64(claims)}.{sig}", KEY.public_key())


# --------------------------------------------------------------------- issue's input
@pytest.mark.parametrize(("over", "needle"), [
    ({"status": "fine"}, "status"),
    ({"checks": {"kernel.text": "ok"}}, "check"),
    ({"vector": {"executables": 300}}, "vector"),
    ({"vector": {"vibes": 2}}, "vector"),
    ({"iat": 100, "exp": 100}, "exp"),
    ({"iat": 100.5, "exp": 200}, "integer"),
    ({"nonce": "short"}, "nonce"),
    ({"nonce": "A" * 13}, "nonce"),  # passes a length check, is no base64
    ({"nonce": base64.urlsafe_b64encode(b"x" * 65).decode()}, "nonce"),
    ({"issuer": ""}, "issuer"),
])
def test_issue_refuses_what_the_draft_forbids(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        issue(**over)
