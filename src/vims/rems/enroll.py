"""Enrollment of an A-VM's vTPM with the REM-S.

The REM-S (1) validates the EK certificate against the configured EK CAs,
(2) checks that the TPM's EK is the certified key, (3) computes the AK's name
itself from the AK public area and runs MakeCredential to the certified EK;
only the TPM holding that EK, with that AK loaded, can recover the secret
(ActivateCredential). The AK is then stored as the A-VM's identity for quotes.

Here both halves run in one process (the one-machine lab, or an operator on the
A-VM host with access to the REM-S database); over the network the same three
messages travel between them.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from vims.errors import VimsError
from vims.rems.store import Store
from vims.tpm.attester import Attester
from vims.tpm.verifier import make_credential, parse_public, validate_ek_certificate


class EnrollmentError(VimsError):
    """The A-VM's vTPM could not be enrolled."""


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def enroll(store: Store, avm_id: str, attester: Attester, ek_ca_certs: list[Path]) -> bytes:
    """Enroll ``avm_id``; returns the AK public key (PEM) now trusted for its quotes."""
    if not ek_ca_certs:
        raise EnrollmentError("no EK CA certificates configured: cannot trust any EK")
    try:
        cert = validate_ek_certificate(attester.ek_certificate(),
                                       [p.read_bytes() for p in ek_ca_certs])
    except Exception as exc:  # the verifier raises typed errors; I/O may too
        raise EnrollmentError(f"EK certificate rejected: {exc}") from exc
    ek = parse_public(attester.ek_public())
    if _spki(ek.key) != _spki(cert.public_key()):
        raise EnrollmentError("the TPM's EK is not the key its certificate certifies")
    ak = parse_public(attester.ak_public_bytes)
    secret = os.urandom(32)
    blob, encrypted = make_credential(ek, ak.name, secret)
    if not hmac.compare_digest(attester.activate_credential(blob, encrypted), secret):
        raise EnrollmentError("ActivateCredential returned another secret: AK not on this TPM")
    ak_pem = ak.key.public_bytes(serialization.Encoding.PEM,
                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    store.enroll(avm_id, ak_pem.decode(),
                 cert.public_bytes(serialization.Encoding.PEM).decode())
    return ak_pem
