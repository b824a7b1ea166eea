"""EAR (EAT Attestation Results, draft-ietf-rats-ear) as ES256-signed JWTs.

A relying party (the nginx gate's decision API, a VPN hook, an Ansible play)
verifies an EAR with any standard JWT library and the REM-S public key, which
the REM-S publishes as a JWK set.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vims import __version__
from vims.rems.verdict import Appraisal, VerdictPolicy

EAR_PROFILE = "tag:github.com,2023:veraison/ear"
ALGORITHM = "ES256"


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def issue(cvm: str, appraisal: Appraisal, policy: VerdictPolicy,
          key: ec.EllipticCurvePrivateKey, now: int, ttl: int,
          extra: dict[str, Any] | None = None) -> str:
    """Sign the verdict for ``cvm``; it expires after ``ttl`` seconds (fail closed)."""
    claims: dict[str, Any] = {
        "eat_profile": EAR_PROFILE,
        "iat": now,
        "exp": now + ttl,
        "ear.verifier-id": {"developer": "vims", "build": f"vims {__version__}"},
        "submods": {
            cvm: {
                "ear.status": appraisal.status,
                "ear.trustworthiness-vector": appraisal.vector,
                "ear.appraisal-policy-id": policy.id,
            }
        },
        **(extra or {}),
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM,
                      headers={"kid": key_id(key.public_key())})


def verify(token: str, public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """Decode and verify an EAR: signature, algorithm (ES256 only), expiry, profile."""
    claims: dict[str, Any] = jwt.decode(token, public_key, algorithms=[ALGORITHM],
                                        options={"require": ["exp", "iat"]})
    if claims.get("eat_profile") != EAR_PROFILE:
        raise jwt.InvalidTokenError("not an EAR (eat_profile)")
    return claims


def jwks(public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The JWK set the REM-S publishes for relying parties."""
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public_key))
    jwk.update({"kid": key_id(public_key), "use": "sig", "alg": ALGORITHM})
    return {"keys": [jwk]}
