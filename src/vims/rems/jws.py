"""The REM-S's compact JWS tokens: one key, three kinds, told apart by ``typ``.

The REM-S signs EARs, webhook notifications and audit checkpoints with the one
EC P-256 key it publishes at ``/.well-known/jwks.json``. A token of one kind must
never pass for another (an EAR replayed as a webhook, a webhook as an EAR), so
every token is explicitly typed (RFC 8725, section 3.11) and :func:`decode`
checks the ``typ`` header, and the algorithm, before any cryptography.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

if TYPE_CHECKING:
    from jwt.types import Options

ALGORITHM = "ES256"

KeySet = Mapping[str, ec.EllipticCurvePublicKey]
"""Public keys by ``kid``: what a JWK set is to a verifier."""


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The ``kid`` of a key: the first 16 hex digits of SHA-256 over its DER SPKI."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def jwks(*public_keys: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """A JWK set (RFC 7517) of the given public keys, each with its ``kid``."""
    keys = []
    for public_key in public_keys:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public_key))
        jwk.update({"kid": key_id(public_key), "use": "sig", "alg": ALGORITHM})
        keys.append(jwk)
    return {"keys": keys}


def keys_from_jwks(jwk_set: Mapping[str, Any]) -> dict[str, ec.EllipticCurvePublicKey]:
    """The P-256 signing keys of a JWK set, by ``kid``; other keys are skipped.

    Raises :class:`ValueError` on a set that is not one (a relying party should
    not silently trust nothing, or something else).
    """
    entries = jwk_set.get("keys") if isinstance(jwk_set, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError("not a JWK set: no 'keys' list")
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or entry.get("kty") != "EC" \
                or entry.get("crv") != "P-256" or entry.get("use", "sig") != "sig" \
                or entry.get("alg", ALGORITHM) != ALGORITHM:
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ValueError("a P-256 key of the JWK set has no kid")
        try:
            key = jwt.algorithms.ECAlgorithm.from_jwk(dict(entry))
        except jwt.InvalidKeyError as exc:
            raise ValueError(f"JWK {kid}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError(f"JWK {kid} is not a public key")
        keys[kid] = key
    if not keys:
        raise ValueError("the JWK set has no ES256 signing key")
    return keys


def sign(claims: Mapping[str, Any], key: ec.EllipticCurvePrivateKey, typ: str,
         kid: str | None = None) -> str:
    """A compact ES256 JWS over ``claims`` with headers ``typ`` and ``kid``."""
    return jwt.encode(dict(claims), key, algorithm=ALGORITHM,
                      headers={"typ": typ, "kid": kid or key_id(key.public_key())})


def decode(token: str, keys: ec.EllipticCurvePublicKey | KeySet, *, typ: str,
           issuer: str | None = None, audience: str | None = None,
           require: Sequence[str] = (), integer_times: Iterable[str] = (),
           leeway_s: float = 0.0) -> dict[str, Any]:
    """Verify a token of kind ``typ`` and return its claims.

    Order matters: the header (``alg`` ES256 only, then ``typ``) is judged before
    any cryptography, the key is chosen by ``kid`` when ``keys`` is a set, then the
    signature, then the claims (``exp`` and ``iat`` when present, ``iss`` and
    ``aud`` when given, every claim in ``require`` present, the ``integer_times``
    ones integers). Raises a :class:`jwt.InvalidTokenError` subclass.
    """
    header = jwt.get_unverified_header(token)
    if header.get("alg") != ALGORITHM:
        raise jwt.InvalidAlgorithmError(f"alg {header.get('alg')!r} is not {ALGORITHM}")
    if header.get("typ") != typ:
        raise jwt.InvalidTokenError(f"typ {header.get('typ')!r} is not {typ!r}")
    if isinstance(keys, ec.EllipticCurvePublicKey):
        key = keys
    else:
        kid = header.get("kid")
        if not isinstance(kid, str) or kid not in keys:
            raise jwt.InvalidTokenError(f"kid {kid!r} is not in the key set")
        key = keys[kid]
    options: Options = {"require": list(require)}
    if audience is None:
        options["verify_aud"] = False  # the caller binds no audience: any is fine
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=[ALGORITHM], issuer=issuer,
                                        audience=audience, options=options,
                                        leeway=leeway_s)
    for name in integer_times:
        value = claims.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise jwt.InvalidTokenError(f"{name} must be an integer, not {value!r}")
    return claims


def token_hash(token: str) -> str:
    """SHA-256 (hex) of a compact token, as one token names another."""
    return hashlib.sha256(token.encode()).hexdigest()
