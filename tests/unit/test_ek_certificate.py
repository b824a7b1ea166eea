"""EK certificate validation and the EK CA, with crafted certificates (no TPM needed).

Each negative case is a certificate an attacker (or a careless CA) could
present as an EK certificate; the positive ones are what the REM-S's own EK
CA issues.
"""

from __future__ import annotations

import datetime
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from vims.tpm.cli import tpm
from vims.tpm.ekca import EkCa, EkCaError, NotAnEk
from vims.tpm.verifier import (
    OID_TCG_AT_TPM_MANUFACTURER,
    OID_TCG_AT_TPM_MODEL,
    OID_TCG_AT_TPM_VERSION,
    OID_TCG_KP_EK_CERTIFICATE,
    EkCertificateError,
    parse_public,
    validate_ek_certificate,
)

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
EK_EKU = x509.ObjectIdentifier(OID_TCG_KP_EK_CERTIFICATE)
PLATFORM_EKU = x509.ObjectIdentifier("2.23.133.8.2")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _usage(**on: bool) -> x509.KeyUsage:
    names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


def tpm_san(*, manufacturer: bool = True) -> x509.SubjectAlternativeName:
    attrs = [(OID_TCG_AT_TPM_MODEL, "swtpm"), (OID_TCG_AT_TPM_VERSION, "id:20191023")]
    if manufacturer:
        attrs.insert(0, (OID_TCG_AT_TPM_MANUFACTURER, "id:00001014"))
    return x509.SubjectAlternativeName([x509.DirectoryName(x509.Name([
        x509.RelativeDistinguishedName([x509.NameAttribute(x509.ObjectIdentifier(o), v)])
        for o, v in attrs]))])


class Ca:
    """A root (and optional intermediates) that signs crafted certificates."""

    def __init__(self, cn: str = "Test TPM Root") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._sign(_name(cn), self.key.public_key(), _name(cn), self.key,
                               ca=True, path_length=None)

    @staticmethod
    def _sign(subject: x509.Name, public: object, issuer: x509.Name,
              key: ec.EllipticCurvePrivateKey, *, ca: bool | None, path_length: int | None,
              before: datetime.datetime = NOW - DAY, after: datetime.datetime = NOW + 365 * DAY,
              extra: Callable[[x509.CertificateBuilder], x509.CertificateBuilder] | None = None,
              ) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
             .public_key(public).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
             .not_valid_before(before).not_valid_after(after))
        if ca is not None:
            b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length),
                                critical=True)
        if ca and extra is None:
            b = b.add_extension(_usage(key_cert_sign=True, crl_sign=True), critical=True)
        if extra is not None:
            b = extra(b)
        return b.sign(key, hashes.SHA256())

    def intermediate(self, cn: str = "Test TPM Issuing CA", *, ca: bool | None = True,
                     path_length: int | None = 0) -> Ca:
        sub = Ca.__new__(Ca)
        sub.key = ec.generate_private_key(ec.SECP256R1())
        sub.cert = self._sign(_name(cn), sub.key.public_key(), self.cert.subject, self.key,
                              ca=ca, path_length=path_length)
        return sub

    def ek_cert(self, ek_key: object, *, eku: list[x509.ObjectIdentifier] | None = None,
                san: x509.SubjectAlternativeName | None = None, usage: x509.KeyUsage | None = None,
                ca: bool = False, before: datetime.datetime = NOW - DAY,
                after: datetime.datetime = NOW + 365 * DAY) -> x509.Certificate:
        if usage is None:
            usage = (_usage(key_encipherment=True) if isinstance(ek_key, rsa.RSAPublicKey)
                     else _usage(key_agreement=True))

        def extra(b: x509.CertificateBuilder) -> x509.CertificateBuilder:
            b = b.add_extension(usage, critical=True)
            b = b.add_extension(san or tpm_san(), critical=True)
            if eku != []:
                b = b.add_extension(x509.ExtendedKeyUsage(eku or [EK_EKU]), critical=False)
            return b

        return self._sign(x509.Name([]), ek_key, self.cert.subject, self.key,
                          ca=ca, path_length=None, before=before, after=after, extra=extra)


@pytest.fixture(scope="module")
def rsa_ek() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(65537, 2048).public_key()


@pytest.fixture(scope="module")
def root() -> Ca:
    return Ca()


@pytest.fixture(scope="module")
def issuing(root: Ca) -> Ca:
    return root.intermediate()


def trust(*cas: Ca) -> list[bytes]:
    return [c.cert.public_bytes(serialization.Encoding.PEM) for c in cas]


def refused(cert: x509.Certificate, cas: list[bytes], why: str) -> None:
    with pytest.raises(EkCertificateError) as exc:
        validate_ek_certificate(cert.public_bytes(serialization.Encoding.DER), cas)
    assert exc.value.reason == "ek-certificate-invalid"
    assert why in exc.value.detail


def test_good_rsa_and_ecc_ek_certificates(root: Ca, issuing: Ca, rsa_ek: rsa.RSAPublicKey,
                                          ) -> None:
    cert = issuing.ek_cert(rsa_ek)
    assert validate_ek_certificate(cert, trust(root, issuing)) == cert
    ecc = issuing.ek_cert(ec.generate_private_key(ec.SECP384R1()).public_key())
    assert validate_ek_certificate(ecc.public_bytes(serialization.Encoding.PEM),
                                   trust(root, issuing)) == ecc
    # The trust list may be one PEM bundle.
    assert validate_ek_certificate(cert, [b"".join(trust(root, issuing))]) == cert


def test_without_the_ek_eku_refused(root: Ca, issuing: Ca, rsa_ek: rsa.RSAPublicKey) -> None:
    """swtpm_localca's platform certificate certifies the EK's key with another EKU."""
    refused(issuing.ek_cert(rsa_ek, eku=[PLATFORM_EKU]), trust(root, issuing),
            "tcg-kp-EKCertificate")
    refused(issuing.ek_cert(rsa_ek, eku=[]), trust(root, issuing),
            "2.5.29.37: Certificate is missing required extension")


def test_without_the_tpm_attributes_refused(root: Ca, issuing: Ca,
                                            rsa_ek: rsa.RSAPublicKey) -> None:
    refused(issuing.ek_cert(rsa_ek, san=tpm_san(manufacturer=False)), trust(root, issuing),
            "tpmManufacturer")
    dns = x509.SubjectAlternativeName([x509.DNSName("avm.example")])
    refused(issuing.ek_cert(rsa_ek, san=dns), trust(root, issuing), "tpmModel")


def test_wrong_key_usage_refused(root: Ca, issuing: Ca, rsa_ek: rsa.RSAPublicKey) -> None:
    refused(issuing.ek_cert(rsa_ek, usage=_usage(digital_signature=True)), trust(root, issuing),
            "keyEncipherment")
    ecc = ec.generate_private_key(ec.SECP256R1()).public_key()
    refused(issuing.ek_cert(ecc, usage=_usage(digital_signature=True)), trust(root, issuing),
            "keyAgreement")


def test_from_the_wrong_ca_refused(root: Ca, issuing: Ca, rsa_ek: rsa.RSAPublicKey) -> None:
    other_root = Ca("Other Root")
    other = other_root.intermediate("Test TPM Issuing CA")  # same name, other key
    refused(other.ek_cert(rsa_ek), trust(root, issuing), "candidates exhausted")
    # Trusting only the intermediate's peer root does not help a self-signed forgery.
    refused(Ca("Test TPM Issuing CA").ek_cert(rsa_ek), trust(root, issuing),
            "candidates exhausted")


def test_expired_and_not_yet_valid_refused(root: Ca, issuing: Ca,
                                           rsa_ek: rsa.RSAPublicKey) -> None:
    refused(issuing.ek_cert(rsa_ek, before=NOW - 10 * DAY, after=NOW - DAY),
            trust(root, issuing), "not valid at validation time")
    refused(issuing.ek_cert(rsa_ek, before=NOW + DAY, after=NOW + 10 * DAY),
            trust(root, issuing), "not valid at validation time")


def test_intermediate_without_ca_true_refused(root: Ca, rsa_ek: rsa.RSAPublicKey) -> None:
    not_ca = root.intermediate(ca=False, path_length=None)
    refused(not_ca.ek_cert(rsa_ek), trust(root, not_ca), "basicConstraints.cA")
    no_bc = root.intermediate(ca=None, path_length=None)
    refused(no_bc.ek_cert(rsa_ek), trust(root, no_bc), "basicConstraints")


def test_path_length_of_issuers_enforced(root: Ca, rsa_ek: rsa.RSAPublicKey) -> None:
    """An issuing CA limited to pathLen 0 cannot vouch for a CA under it."""
    limited = root.intermediate("Limited", path_length=0)
    rogue = limited.intermediate("Rogue sub-CA")
    refused(rogue.ek_cert(rsa_ek), trust(root, limited, rogue), "candidates exhausted")
    unlimited = root.intermediate("Unlimited", path_length=1)
    sub = unlimited.intermediate("Sub")
    validate_ek_certificate(sub.ek_cert(rsa_ek), trust(root, unlimited, sub))


def test_ek_certificate_that_is_a_ca_refused(root: Ca, issuing: Ca,
                                             rsa_ek: rsa.RSAPublicKey) -> None:
    refused(issuing.ek_cert(rsa_ek, ca=True), trust(root, issuing), "must not be a CA")


def test_no_root_and_garbage(issuing: Ca, rsa_ek: rsa.RSAPublicKey) -> None:
    refused(issuing.ek_cert(rsa_ek), trust(issuing), "no trusted root")
    with pytest.raises(EkCertificateError):
        validate_ek_certificate(b"not a certificate", trust(issuing))


# --- the EK CA -------------------------------------------------------------------------

ALG_RSA, ALG_SHA256, ALG_NULL, ALG_AES, ALG_CFB = 0x0001, 0x000B, 0x0010, 0x0006, 0x0043
EK_ATTRS = 0x000300B2  # fixedTPM fixedParent sensitiveDataOrigin adminWithPolicy restricted decrypt


def rsa_ek_public(key: rsa.RSAPublicKey, attrs: int = EK_ATTRS) -> bytes:
    n = key.public_numbers().n.to_bytes(256, "big")
    body = struct.pack(">HHIH", ALG_RSA, ALG_SHA256, attrs, 0)
    body += struct.pack(">HHH", ALG_AES, 128, ALG_CFB) + struct.pack(">H", ALG_NULL)
    body += struct.pack(">HI", 2048, 0) + struct.pack(">H", len(n)) + n
    return struct.pack(">H", len(body)) + body


def test_ek_ca_init_is_idempotent_and_keeps_keys_private(tmp_path: Path) -> None:
    ca, created = EkCa.init(tmp_path / "ek-ca")
    assert created
    again, created_again = EkCa.init(tmp_path / "ek-ca")
    assert not created_again
    assert again.root == ca.root
    for key in ("root.key", "issuer.key"):
        assert stat.S_IMODE((tmp_path / "ek-ca" / key).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ek-ca").stat().st_mode) == 0o700
    (tmp_path / "ek-ca" / "issuer.key").unlink()
    with pytest.raises(EkCaError, match="incomplete"):
        EkCa.init(tmp_path / "ek-ca")


def test_ek_ca_issues_profile_certificates_once(tmp_path: Path, rsa_ek: rsa.RSAPublicKey,
                                                ) -> None:
    ca, _ = EkCa.init(tmp_path / "ek-ca")
    cert, issued = ca.issue(rsa_ek_public(rsa_ek))
    assert issued
    assert validate_ek_certificate(cert, [p.read_bytes() for p in ca.cert_paths]) == cert
    assert cert.subject == x509.Name([])
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    assert cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("2.5.29.9"))
    same, issued_again = ca.issue(rsa_ek_public(rsa_ek))
    assert (same, issued_again) == (cert, False)
    other, _ = EkCa.init(tmp_path / "other")
    refused(cert, [p.read_bytes() for p in other.cert_paths], "candidates exhausted")


def test_ek_ca_refuses_what_is_not_an_ek(tmp_path: Path, rsa_ek: rsa.RSAPublicKey) -> None:
    ca, _ = EkCa.init(tmp_path / "ek-ca")
    signing = rsa_ek_public(rsa_ek, attrs=0x00050072)  # an AK-like signing key
    with pytest.raises(NotAnEk):
        ca.issue(signing)
    assert parse_public(signing).key == rsa_ek


def test_cli_ek_ca_init_and_issue(tmp_path: Path, rsa_ek: rsa.RSAPublicKey) -> None:
    import base64
    import json

    runner = CliRunner()
    ca_dir = tmp_path / "ek-ca"
    first = runner.invoke(tpm, ["ek-ca", "init", "--dir", str(ca_dir), "--format", "json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["changed"] is True
    second = runner.invoke(tpm, ["ek-ca", "init", "--dir", str(ca_dir), "--format", "json"])
    assert json.loads(second.stdout) == {**json.loads(first.stdout), "changed": False}

    doc = {"ek": "rsa", "ek_public_b64": base64.b64encode(rsa_ek_public(rsa_ek)).decode(),
           "tpm": {"manufacturer": "id:49424D00", "model": "SW   TPM", "version": "id:20191023"}}
    (tmp_path / "ek.json").write_text(json.dumps(doc))
    args = ["ek-ca", "issue", "--dir", str(ca_dir), "--ek-public", str(tmp_path / "ek.json"),
            "--out", str(tmp_path / "ek.pem"), "--format", "json"]
    issued = runner.invoke(tpm, args)
    assert issued.exit_code == 0, issued.output
    assert json.loads(issued.stdout)["changed"] is True
    again = runner.invoke(tpm, args)
    assert json.loads(again.stdout)["changed"] is False  # idempotent: same certificate
    cert = x509.load_pem_x509_certificate((tmp_path / "ek.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "id:49424D00" in str(san)

    doc["ek_public_b64"] = base64.b64encode(rsa_ek_public(rsa_ek, attrs=0x00050072)).decode()
    (tmp_path / "ak.json").write_text(json.dumps(doc))
    not_ek = runner.invoke(tpm, [*args[:4], "--ek-public", str(tmp_path / "ak.json"),
                                 *args[6:]])
    assert not_ek.exit_code == 1
    assert not_ek.stderr.startswith("vims: error: ")
    bad = runner.invoke(tpm, ["ek-ca", "issue", "--dir", str(tmp_path / "nope"),
                              "--ek-public", str(tmp_path / "ek.json"), "--out", "x.pem"])
    assert bad.exit_code == 2
    assert len(bad.stderr.strip().splitlines()) == 1
