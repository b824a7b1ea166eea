"""EAR (EAT Attestation Results, draft-ietf-rats-ear-04) as ES256-signed JWTs.

A relying party (the nginx gate's decision API, a VPN hook, an Ansible play)
verifies an EAR with any standard JOSE library and the REM-S public key, which
the REM-S publishes as a JWK set (``/.well-known/jwks.json``).

The claims-set follows the draft's JSON serialisation; one EAR speaks for one
C-VM, its one submodule::

    {
      "eat_profile": "tag:ietf.org,2026:rats/ear#04",
      "iss": "<the REM-S>", "iat": 1767225600, "exp": 1767225630,
      "ear_status": "contraindicated",                   # overall: the worst submod
      "ear_verifier_id": {"developer": "vims", "build": "vims 0.1.0"},
      "eat_nonce": "<the relying party's nonce, base64url>",   # when one was given
      "vims_deployment": {"insecure_lab": true},         # only from an insecure lab
      "submods": {"<cvm>": {
        "ear_status": "contraindicated",
        "ear_trustworthiness_vector": {"executables": 96, ...},  # AR4SI, non-empty
        "ear_appraisal_policy_ids": ["policy:lab@3"],
        "vims_checks": {"kernel.text": "pass", "kernel.syscall_table": "fail", ...}
      }}
    }

Draft -03 renamed the claims (``ear.status`` became ``ear_status``, the policy id
became a list) and replaced the Veraison profile ``tag:github.com,2023:veraison/ear``
with the IETF one; -04 bumped its revision. ``vims_checks`` and
``vims_deployment`` are unregistered extensions, maps as the draft requires, and
the submodule's profile is implied by ``ear_verifier_id`` (the draft's "other
means"). The header is typed ``eat+jwt`` (RFC 9782's media type
``application/eat+jwt``), which keeps the REM-S's other tokens, signed with the
same key, from passing for an EAR.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from vims import __version__
from vims.rems.jws import ALGORITHM, jwks, key_id
from vims.rems.jws import decode as _decode
from vims.rems.jws import sign as _sign

__all__ = ["ALGORITHM", "AR4SI_CLAIMS", "CHECK_STATUSES", "EAR_PROFILE", "EAR_TYP", "TIERS",
           "check_nonce", "issue", "jwks", "key_id", "verify"]

EAR_PROFILE = "tag:ietf.org,2026:rats/ear#04"
EAR_TYP = "eat+jwt"
VERIFIER_ID = {"developer": "vims", "build": f"vims {__version__}"}
TIERS = ("none", "affirming", "warning", "contraindicated")
AR4SI_CLAIMS = ("instance-identity", "configuration", "executables", "file-system",
                "hardware", "runtime-opaque", "storage-opaque", "sourced-data")
CHECK_STATUSES = ("pass", "fail", "stale", "error", "not_applicable")
CHECKS_CLAIM = "vims_checks"
DEPLOYMENT_CLAIM = "vims_deployment"
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")


def issue(cvm: str, *, status: str, vector: dict[str, int], policy_id: str,
          checks: dict[str, str], key: ec.EllipticCurvePrivateKey, iat: int, exp: int,
          issuer: str, nonce: str | None = None, insecure_lab: bool = False) -> str:
    """Sign the attestation result for ``cvm``, valid from ``iat`` until ``exp``.

    ``status`` is the AR4SI tier of the C-VM, ``vector`` its trustworthiness
    vector (AR4SI claim -> -128..127), ``checks`` each check's status, ``issuer``
    the REM-S's identity (its URL or verifier id), ``nonce`` the relying party's
    (8 to 64 bytes, base64url), echoed as ``eat_nonce``. Raises
    :class:`ValueError` on input the draft forbids rather than sign it.
    """
    if status not in TIERS:
        raise ValueError(f"status {status!r} is not an AR4SI tier {TIERS}")
    for claim, value in vector.items():
        if claim not in AR4SI_CLAIMS or not _is_int(value) or not -128 <= value <= 127:
            raise ValueError(f"trustworthiness vector entry {claim!r}: {value!r}")
    for check, result in checks.items():
        if result not in CHECK_STATUSES:
            raise ValueError(f"check {check!r}: status {result!r} is not one of "
                             f"{CHECK_STATUSES}")
    if not _is_int(iat) or not _is_int(exp):
        raise ValueError("iat and exp must be integer seconds (EAR forbids floating point)")
    if exp <= iat:
        raise ValueError(f"exp {exp} is not after iat {iat}")
    if not issuer:
        raise ValueError("an EAR needs its issuer")
    appraisal: dict[str, Any] = {"ear_status": status}
    if vector:  # the draft's vector is non-empty when present
        appraisal["ear_trustworthiness_vector"] = dict(vector)
    appraisal["ear_appraisal_policy_ids"] = [policy_id]
    appraisal[CHECKS_CLAIM] = dict(checks)
    claims: dict[str, Any] = {
        "eat_profile": EAR_PROFILE,
        "iss": issuer,
        "iat": iat,
        "exp": exp,
        "ear_status": status,  # one submod: the overall status is its status
        "ear_verifier_id": VERIFIER_ID,
        "submods": {cvm: appraisal},
    }
    if nonce is not None:
        check_nonce(nonce)
        claims["eat_nonce"] = nonce
    if insecure_lab:
        claims[DEPLOYMENT_CLAIM] = {"insecure_lab": True}
    return _sign(claims, key, EAR_TYP)


def verify(token: str, public_key: ec.EllipticCurvePublicKey, issuer: str | None = None,
           nonce: str | None = None) -> dict[str, Any]:
    """Decode and verify an EAR; its claims, or a :class:`jwt.InvalidTokenError`.

    Checked: algorithm ES256 only (before any cryptography), type ``eat+jwt``,
    signature, ``exp`` and ``iat`` present, integers and current, the EAR
    profile, the issuer when ``issuer`` is given, ``eat_nonce`` equal to
    ``nonce`` when one is given.
    """
    claims = _decode(token, public_key, typ=EAR_TYP, issuer=issuer,
                     require=("exp", "iat", "eat_profile", "submods"),
                     integer_times=("exp", "iat", "nbf"))
    if claims.get("eat_profile") != EAR_PROFILE:
        raise jwt.InvalidTokenError(f"not an EAR of this profile (eat_profile "
                                    f"{claims.get('eat_profile')!r})")
    if nonce is not None:
        echoed = claims.get("eat_nonce")
        if not isinstance(echoed, str) or not hmac.compare_digest(echoed, nonce):
            raise jwt.InvalidTokenError("eat_nonce is not the nonce asked for")
    return claims


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_nonce(nonce: str) -> None:
    """EAT's nonce: 8 to 64 bytes, which a JWT carries base64url-encoded.

    Raises :class:`ValueError` otherwise (a length of 1 mod 4 is no base64 at all):
    usable as the API's validator, so a bad nonce is the caller's 422, not a 500.
    """
    if not _BASE64URL.match(nonce):
        raise ValueError("nonce must be base64url")
    try:
        raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"nonce is not base64url: {exc}") from exc
    if not 8 <= len(raw) <= 64:
        raise ValueError(f"nonce must carry 8 to 64 bytes, not {len(raw)}")
