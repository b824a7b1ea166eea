"""Enrollment over the network: a real REM-S process, real swtpm vTPMs, `vims avm enroll`."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vims.lab.deploy import LabDeployment, deploy
from vims.rems.store import Store
from vims.tpm.attester import Attester
from vims.tpm.swtpm import LocalCa, Swtpm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dep() -> Iterator[LabDeployment]:
    root = Path(tempfile.mkdtemp(prefix="vims-enroll-"))
    d = deploy(root, ram=root / "cvm.ram", profile=root / "profile.json", baseline=None,
               local_policy=None)
    d.start_rems()
    try:
        yield d
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)


def avm_enroll(dep: LabDeployment, config: Path, token_file: Path | None = None
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vims.cli", "avm", "enroll", "--config", str(config),
         "--rems-url", dep.http_url, "--token-file", str(token_file or dep.root / "admin.token"),
         "--format", "json"], capture_output=True, text=True, timeout=120, check=False)


def test_enroll_issues_the_client_certificate_and_is_idempotent(dep: LabDeployment) -> None:
    pki = dep.root / "pki"
    first = avm_enroll(dep, dep.avm_config)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["avm_id"] == "avm1"
    assert result["changed"] is True
    store = Store(f"sqlite:///{dep.root / 'rems.db'}")
    assert store.ak_of("avm1") is not None
    assert len(result["ak_sha256"]) == 64

    cert = x509.load_pem_x509_certificate((pki / "avm.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=avm1"
    key = (pki / "avm.key")
    assert key.stat().st_mode & 0o077 == 0  # the A-VM's private key is its own
    assert cert.public_key() == ec_public(key)

    before = (pki / "avm.pem").read_bytes()
    again = avm_enroll(dep, dep.avm_config)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {**result, "changed": False}
    assert (pki / "avm.pem").read_bytes() == before


def ec_public(key_path: Path) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.public_key()


def test_wrong_token_is_refused_with_exit_1(dep: LabDeployment, tmp_path: Path) -> None:
    bad = tmp_path / "token"
    bad.write_text("not-the-operator-token\n")
    done = avm_enroll(dep, dep.avm_config, bad)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "refused" in done.stderr


def test_vtpm_from_an_untrusted_manufacturer_is_refused(dep: LabDeployment,
                                                        tmp_path: Path) -> None:
    """Another CA's EK certificate: the REM-S trusts no such TPM; nothing is stored."""
    rogue = Swtpm(tmp_path / "swtpm", LocalCa(tmp_path / "rogue-ca"))
    rogue.manufacture()
    rogue.start()
    try:
        text = dep.avm_config.read_text()
        config = tmp_path / "avm.toml"
        config.write_text(text.replace('avm_id = "avm1"', 'avm_id = "rogue"')
                          .replace(dep.swtpm.tcti, rogue.tcti)
                          .replace(str(dep.root / "pki" / "avm."), str(tmp_path / "avm.")))
        done = avm_enroll(dep, config)
    finally:
        rogue.stop()
    assert done.returncode == 1, done.stderr
    assert "EK certificate" in done.stderr
    assert Store(f"sqlite:///{dep.root / 'rems.db'}").ak_of("rogue") is None
    assert not (tmp_path / "avm.pem").exists()  # no certificate for a refused A-VM


def test_activation_needs_the_tpm_secret_once(dep: LabDeployment) -> None:
    """A guessed secret is refused and burns the session; a session is single-use."""
    with Attester(dep.swtpm.tcti) as tpm:
        tpm.create_ak()
        body = {"avm_id": "avm1",
                "ek_certificate_b64": base64.b64encode(tpm.ek_certificate()).decode(),
                "ek_public_b64": base64.b64encode(tpm.ek_public()).decode(),
                "ak_public_b64": base64.b64encode(tpm.ak_public_bytes).decode()}
        status, raw = dep.call("POST", "/v1/enroll", json.dumps(body).encode())
        assert status == 200, raw
        challenge = json.loads(raw)
        guess = json.dumps({"secret_b64": base64.b64encode(b"\0" * 32).decode()}).encode()
        status, raw = dep.call("POST", f"/v1/enroll/{challenge['session']}/activate", guess)
        assert status == 403
        assert b"another secret" in raw
        secret = tpm.activate_credential(base64.b64decode(challenge["credential_blob_b64"]),
                                         base64.b64decode(challenge["encrypted_secret_b64"]))
    right = json.dumps({"secret_b64": base64.b64encode(secret).decode()}).encode()
    status, raw = dep.call("POST", f"/v1/enroll/{challenge['session']}/activate", right)
    assert status == 403  # the failed guess used the session up
    assert b"no such enrollment session" in raw


@pytest.mark.parametrize(("change", "status"), [
    ({"ek_certificate_b64": "not base64!"}, 422),
    ({"ek_public_b64": base64.b64encode(b"\x00\x02ab").decode()}, 403),
    ({"csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"}, 403),
    ({"avm_id": "../etc"}, 422),
    ({"extra": 1}, 422),
])
def test_malformed_enrollment_requests(dep: LabDeployment, change: dict[str, object],
                                       status: int) -> None:
    with Attester(dep.swtpm.tcti) as tpm:
        tpm.create_ak()
        body = {"avm_id": "avm1",
                "ek_certificate_b64": base64.b64encode(tpm.ek_certificate()).decode(),
                "ek_public_b64": base64.b64encode(tpm.ek_public()).decode(),
                "ak_public_b64": base64.b64encode(tpm.ak_public_bytes).decode(), **change}
    got, raw = dep.call("POST", "/v1/enroll", json.dumps(body).encode())
    assert got == status, raw


def test_non_restricted_signing_key_as_ak_is_refused(dep: LabDeployment) -> None:
    """The attack: a key that signs anything, presented as the AK.

    A non-restricted signing key on the same TPM passes MakeCredential/
    ActivateCredential (it is loaded, it has a name), and with it an attacker
    signs any TPMS_ATTEST they like - a forged quote over golden PCRs. The
    REM-S must refuse it at enrollment, before any challenge is issued.
    """
    from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
    from tpm2_pytss.types import TPM2B_PUBLIC

    with Attester(dep.swtpm.tcti) as tpm:
        template = TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256:null",
            objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
            | TPMA_OBJECT.SIGN_ENCRYPT)  # no RESTRICTED
        handle, rogue_pub, _, _, _ = tpm.esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        try:
            body = {"avm_id": "rogue-ak",
                    "ek_certificate_b64": base64.b64encode(tpm.ek_certificate()).decode(),
                    "ek_public_b64": base64.b64encode(tpm.ek_public()).decode(),
                    "ak_public_b64": base64.b64encode(bytes(rogue_pub.marshal())).decode()}
            status, raw = dep.call("POST", "/v1/enroll", json.dumps(body).encode())
        finally:
            tpm.esapi.flush_context(handle)
    assert status == 403, raw
    assert b"ak-attributes" in raw
    assert b"restricted" in raw
    assert Store(f"sqlite:///{dep.root / 'rems.db'}").ak_of("rogue-ak") is None
