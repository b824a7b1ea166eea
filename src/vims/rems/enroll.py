"""Enrollment of an A-VM's vTPM with the REM-S.

The REM-S (1) validates the EK certificate against the configured EK CAs,
(2) checks that the TPM's EK is the certified key, (3) computes the AK's name
itself from the AK public area and runs MakeCredential to the certified EK;
only the TPM holding that EK, with that AK loaded, can recover the secret
(ActivateCredential). The AK is then stored as the A-VM's identity for quotes,
and, when the A-VM sent a certificate signing request, the REM-S CA issues its
control-channel client certificate naming the A-VM.

:class:`Enroller` holds the REM-S half: ``challenge`` then ``complete``, as the
HTTP API (``POST /v1/enroll``, ``POST /v1/enroll/{session}/activate``) drives
it; :func:`enroll` runs both halves in one process (an operator with the
REM-S database at hand, or the one-machine lab).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vims.errors import VimsError
from vims.protocol.pki import CertificateAuthority
from vims.rems.store import Store
from vims.tpm.verifier import (
    QuoteError,
    check_ak_public,
    make_credential,
    parse_public,
    validate_ek_certificate,
)

if TYPE_CHECKING:  # the REM-S itself never talks to a TPM: keep tpm2-pytss out of it
    from vims.tpm.attester import Attester

MAX_PENDING = 64  # enrollment sessions awaiting their activation
SESSION_TTL_S = 120.0


class EnrollmentError(VimsError):
    """The A-VM's vTPM could not be enrolled."""


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


@dataclass(frozen=True)
class Challenge:
    """A MakeCredential challenge and what enrolling will store once it is answered."""

    session: str
    avm_id: str
    ak_pem: str
    ek_cert_pem: str
    credential_blob: bytes
    encrypted_secret: bytes
    secret: bytes
    csr: x509.CertificateSigningRequest | None
    expires: float


@dataclass(frozen=True)
class Enrolled:
    avm_id: str
    changed: bool  # False when this very AK was already the A-VM's
    ak_sha256: str
    certificate_pem: str | None  # the A-VM's client certificate, when it sent a CSR


class Enroller:
    """The REM-S half of enrollment, with bounded, expiring pending sessions."""

    def __init__(self, store: Store, ek_ca_certs: list[Path],
                 ca: CertificateAuthority | None = None) -> None:
        self.store, self.ca = store, ca
        self._ek_cas = [p.read_bytes() for p in ek_ca_certs]
        self._pending: dict[str, Challenge] = {}

    def challenge(self, avm_id: str, ek_certificate: bytes, ek_public: bytes,
                  ak_public: bytes, csr_pem: bytes | None = None) -> Challenge:
        """Check the EK and bind the AK to it; raises :class:`EnrollmentError`."""
        if not self._ek_cas:
            raise EnrollmentError("no EK CA certificates configured: cannot trust any EK")
        now = time.monotonic()
        self._pending = {k: c for k, c in self._pending.items() if c.expires > now}
        if len(self._pending) >= MAX_PENDING:
            raise EnrollmentError(f"{MAX_PENDING} enrollments pending: try again later")
        try:
            cert = validate_ek_certificate(ek_certificate, self._ek_cas)
            ek = parse_public(ek_public)
            ak = parse_public(ak_public)
        except Exception as exc:  # the verifier raises typed errors; all mean "refused"
            raise EnrollmentError(f"EK certificate or TPM public area rejected: {exc}") from exc
        try:
            # ActivateCredential proves only that a key of this name is loaded in the
            # EK's TPM: any key would answer. Only a restricted signing key born there
            # makes quotes that the TPM itself composed (no forged TPMS_ATTEST).
            check_ak_public(ak)
        except QuoteError as exc:
            raise EnrollmentError(f"not an attestation key: {exc}") from exc
        if _spki(ek.key) != _spki(cert.public_key()):
            raise EnrollmentError("the TPM's EK is not the key its certificate certifies")
        csr = None
        if csr_pem is not None:
            if self.ca is None:
                raise EnrollmentError("this REM-S has no CA to issue A-VM certificates")
            try:
                csr = x509.load_pem_x509_csr(csr_pem)
            except ValueError as exc:
                raise EnrollmentError(f"certificate signing request: {exc}") from exc
            if not csr.is_signature_valid:
                raise EnrollmentError("certificate signing request: bad signature")
            key = csr.public_key()
            if not (isinstance(key, ec.EllipticCurvePublicKey)
                    and isinstance(key.curve, ec.SECP256R1)):
                raise EnrollmentError("certificate signing request: the key must be EC P-256")
        secret = os.urandom(32)
        blob, encrypted = make_credential(ek, ak.name, secret)
        ak_pem = ak.key.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        challenge = Challenge(
            session=secrets.token_hex(16), avm_id=avm_id, ak_pem=ak_pem,
            ek_cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            credential_blob=blob, encrypted_secret=encrypted, secret=secret, csr=csr,
            expires=now + SESSION_TTL_S)
        self._pending[challenge.session] = challenge
        return challenge

    def pending_avm(self, session: str) -> str | None:
        """The A-VM a pending (unexpired) enrollment session is for, or None."""
        challenge = self._pending.get(session)
        if challenge is None or challenge.expires <= time.monotonic():
            return None
        return challenge.avm_id

    def complete(self, session: str, secret: bytes) -> Enrolled:
        """The A-VM's ActivateCredential answer: store the AK, issue the certificate."""
        challenge = self._pending.pop(session, None)
        if challenge is None or challenge.expires <= time.monotonic():
            raise EnrollmentError("no such enrollment session (expired or already used)")
        if not hmac.compare_digest(secret, challenge.secret):
            raise EnrollmentError("ActivateCredential returned another secret: AK not on this TPM")
        cert_pem = None
        if challenge.csr is not None and self.ca is not None:  # key checked in challenge()
            cert = self.ca.certify_client(challenge.avm_id, challenge.csr.public_key())
            cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        changed = self.store.ak_of(challenge.avm_id) != challenge.ak_pem
        if changed:
            self.store.enroll(challenge.avm_id, challenge.ak_pem, challenge.ek_cert_pem)
        return Enrolled(challenge.avm_id, changed,
                        hashlib.sha256(challenge.ak_pem.encode()).hexdigest(), cert_pem)


def enroll(store: Store, avm_id: str, attester: Attester, ek_ca_certs: list[Path]) -> Enrolled:
    """Enroll ``avm_id`` in one process (both halves); returns what was stored."""
    enroller = Enroller(store, ek_ca_certs)
    challenge = enroller.challenge(avm_id, attester.ek_certificate(), attester.ek_public(),
                                   attester.ak_public_bytes)
    secret = attester.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    return enroller.complete(challenge.session, secret)
