"""``vims avm enroll``: the A-VM's half of enrollment, over the REM-S HTTP API.

The A-VM sends its EK certificate and the public areas of its EK and AK; the
REM-S answers with a MakeCredential challenge that only this TPM, holding that
AK, can open (ActivateCredential). When the A-VM has no control-channel
certificate yet, it creates its key here (it never leaves the A-VM) and sends a
CSR; the REM-S CA's certificate naming the A-VM comes back with the result.
Running it again with the same vTPM changes nothing.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vims.avm.config import AvmConfig
from vims.errors import VimsError
from vims.protocol.pki import load_or_create_key, write_private


class EnrollRefused(VimsError):
    """The REM-S refused the enrollment (exit 1: a verdict, not a usage error)."""

    exit_code = 1


@dataclass(frozen=True)
class EnrollResult:
    avm_id: str
    changed: bool
    ak_sha256: str


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        return load_or_create_key(path)
    except ValueError as exc:  # also an unreadable PEM
        raise VimsError(f"A-VM key {path}: {exc}") from exc


def rems_tls(ca: Path) -> ssl.SSLContext:
    """Verification of an https REM-S: against its CA when the A-VM has it."""
    ctx = ssl.create_default_context()
    if ca.exists():
        ctx.load_verify_locations(cafile=str(ca))
    return ctx


def _csr(avm_id: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, avm_id)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        resp = client.post(path, json=body)
    except httpx.HTTPError as exc:
        raise VimsError(f"REM-S {client.base_url}: {exc}") from exc
    if resp.status_code in (401, 403):
        try:
            detail = str(resp.json().get("detail", ""))
        except ValueError:
            detail = resp.text[:200]
        raise EnrollRefused(f"REM-S refused enrollment: {detail or resp.reason_phrase}")
    if resp.status_code != 200:
        raise VimsError(f"REM-S {path}: HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        data = resp.json()
    except ValueError as exc:
        raise VimsError(f"REM-S {path}: answer is not JSON") from exc
    if not isinstance(data, dict):
        raise VimsError(f"REM-S {path}: answer is not a JSON object")
    return data


def enroll(config: AvmConfig, rems_url: str, token: str, timeout: float = 30.0,
           ca: Path | None = None) -> EnrollResult:
    """Enroll this A-VM's vTPM with the REM-S at *rems_url* (its HTTP API); an https
    REM-S is verified against *ca* (default: the config's REM-S CA)."""
    from vims.tpm.attester import Attester  # tpm2-pytss: only where a TPM is used

    need_cert = not config.cert.exists()
    csr = _csr(config.avm_id, load_key(config.key)) if need_cert else None
    b64 = base64.b64encode
    with Attester(config.tpm_tcti) as tpm, httpx.Client(
            base_url=rems_url, timeout=timeout, verify=rems_tls(ca or config.ca),
            headers={"Authorization": f"Bearer {token}"}) as client:
        tpm.create_ak()
        challenge = _post(client, "/v1/enroll", {
            "avm_id": config.avm_id,
            "ek_certificate_b64": b64(tpm.ek_certificate()).decode(),
            "ek_public_b64": b64(tpm.ek_public()).decode(),
            "ak_public_b64": b64(tpm.ak_public_bytes).decode(),
            **({"csr_pem": csr.decode()} if csr else {})})
        try:
            secret = tpm.activate_credential(
                base64.b64decode(challenge["credential_blob_b64"], validate=True),
                base64.b64decode(challenge["encrypted_secret_b64"], validate=True))
            session = str(challenge["session"])
        except (KeyError, ValueError) as exc:
            raise VimsError(f"REM-S sent a malformed enrollment challenge: {exc}") from exc
        done = _post(client, f"/v1/enroll/{session}/activate",
                     {"secret_b64": b64(secret).decode()})
    if need_cert:
        if not done.get("certificate_pem"):
            raise VimsError("REM-S enrolled the AK but issued no certificate (no CA configured)")
        if done.get("ca_pem") and not config.ca.exists():
            write_private(config.ca, str(done["ca_pem"]).encode(), 0o644)
        write_private(config.cert, str(done["certificate_pem"]).encode(), 0o644)
    return EnrollResult(str(done["avm_id"]), bool(done["changed"]) or need_cert,
                        str(done["ak_sha256"]))
