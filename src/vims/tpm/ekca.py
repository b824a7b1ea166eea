"""The EK CA: the REM-S side of manufacturing a vTPM (who vouches for an EK).

A TPM vendor certifies each EK it makes with a CA whose key never leaves the
vendor; the verifier trusts that CA. swtpm_localca run on the A-VM host turns
this upside down: the attested host holds the CA key and may certify any key
as an "EK". Here the CA lives on the REM-S host: the A-VM host creates the EK
(swtpm_setup without certificates), sends only the EK public area, and writes
the certificate the REM-S issued into the TPM's NV like a manufacturer does.

Layout of the CA directory (keys 0600, the directory 0700)::

    root.pem, root.key        self-signed root (the REM-S's trust anchor)
    issuer.pem, issuer.key    intermediate that signs the EK certificates
    issued/<sha256>.pem       certificates issued, by SHA-256 of the EK's TPMT_PUBLIC

Root + intermediate, as TPM vendors publish: the REM-S's trust anchor does not
change when the issuing key is rotated, the root key is used once (it could go
offline), and the REM-S's chain validation is exercised with an intermediate.
Certificates follow the TCG EK Credential Profile (2.x): empty subject with a
critical subjectAltName directoryName of tpmManufacturer/tpmModel/tpmVersion,
EKU tcg-kp-EKCertificate, keyUsage keyEncipherment (RSA) or keyAgreement
(ECC), basicConstraints CA=false, the TPM specification in
subjectDirectoryAttributes.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from vims.errors import VimsError
from vims.tpm.verifier import (
    OID_TCG_AT_TPM_MANUFACTURER,
    OID_TCG_AT_TPM_MODEL,
    OID_TCG_AT_TPM_VERSION,
    OID_TCG_KP_EK_CERTIFICATE,
    QuoteError,
    TpmPublic,
    parse_public,
    validate_ek_certificate,
)

#: tcg-at-tpmSpecification (TCG EK Credential Profile §3.2.10).
_OID_TCG_AT_TPM_SPECIFICATION = "2.23.133.2.16"
_OID_SUBJECT_DIRECTORY_ATTRIBUTES = x509.ObjectIdentifier("2.5.29.9")
# RFC 5280 §4.1.2.5: an EK certificate lives as long as its TPM.
_NO_EXPIRY = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


class EkCaError(VimsError):
    """The EK CA directory is missing, incomplete or cannot issue this certificate."""


class NotAnEk(EkCaError):
    """The public area offered for certification is not an EK (exit 1: refused)."""

    exit_code = 1


@dataclass(frozen=True)
class TpmInfo:
    """What the EK certificate says about the TPM (TCG attributes)."""

    manufacturer: str = "id:00001014"  # TPM_PT_MANUFACTURER as "id:%08X"
    model: str = "swtpm"
    version: str = "id:00000000"  # firmware version as "id:%08X"
    spec_family: str = "2.0"
    spec_level: int = 0
    spec_revision: int = 164


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _der_int(v: int) -> bytes:
    return _der(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big"))


def _der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([parts[0] * 40 + parts[1]])
    for arc in parts[2:]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _tpm_specification(info: TpmInfo) -> bytes:
    """subjectDirectoryAttributes with TPMSpecification (cryptography has no builder)."""
    spec = _der(0x30, _der(0x0C, info.spec_family.encode()) + _der_int(info.spec_level)
                + _der_int(info.spec_revision))
    attribute = _der(0x30, _der_oid(_OID_TCG_AT_TPM_SPECIFICATION) + _der(0x31, spec))
    return _der(0x30, attribute)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ski(key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


class EkCa:
    """An EK CA in a directory; :meth:`init` creates it, the constructor opens it."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        try:
            self.root = x509.load_pem_x509_certificate(self.root_cert.read_bytes())
            self.issuer = x509.load_pem_x509_certificate(self.issuer_cert.read_bytes())
            key = serialization.load_pem_private_key((self.dir / "issuer.key").read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise EkCaError(f"EK CA {self.dir}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise EkCaError(f"EK CA {self.dir}: issuer.key is not an EC key")
        if key.public_key() != self.issuer.public_key():
            raise EkCaError(f"EK CA {self.dir}: issuer.key does not match issuer.pem")
        self._key = key

    @property
    def root_cert(self) -> Path:
        return self.dir / "root.pem"

    @property
    def issuer_cert(self) -> Path:
        return self.dir / "issuer.pem"

    @property
    def cert_paths(self) -> list[Path]:
        """What the REM-S lists in ``ek_ca_certs`` (trust anchor and intermediate)."""
        return [self.root_cert, self.issuer_cert]

    @property
    def ca_cert_paths(self) -> list[Path]:
        """Same as :attr:`cert_paths` (the name :class:`vims.tpm.swtpm.LocalCa` uses)."""
        return self.cert_paths

    @classmethod
    def init(cls, directory: Path, name: str = "VIMS EK CA") -> tuple[EkCa, bool]:
        """Open the CA in ``directory``, creating it first if needed; ``(ca, created)``.

        Idempotent: an existing complete CA is left as it is. A partial one (a
        crash half-way) is an error rather than overwritten: its root may
        already be trusted somewhere.
        """
        directory = Path(directory)
        files = [directory / f for f in ("root.pem", "root.key", "issuer.pem", "issuer.key")]
        present = [f for f in files if f.exists()]
        if len(present) == len(files):
            return cls(directory), False
        if present:
            raise EkCaError(f"EK CA {directory} is incomplete (has {present[0].name}, "
                            "lacks others): remove it or restore it")
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        (directory / "issued").mkdir(mode=0o700, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        root_key = ec.generate_private_key(ec.SECP384R1())
        issuer_key = ec.generate_private_key(ec.SECP384R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "VIMS"),
                               x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root")])
        issuer_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "VIMS"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ca_usage = x509.KeyUsage(digital_signature=False, content_commitment=False,
                                 key_encipherment=False, data_encipherment=False,
                                 key_agreement=False, key_cert_sign=True, crl_sign=True,
                                 encipher_only=False, decipher_only=False)
        root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
                .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(_NO_EXPIRY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
                .add_extension(ca_usage, critical=True)
                .add_extension(_ski(root_key.public_key()), critical=False)
                .sign(root_key, hashes.SHA384()))
        issuer = (x509.CertificateBuilder().subject_name(issuer_name).issuer_name(root_name)
                  .public_key(issuer_key.public_key()).serial_number(x509.random_serial_number())
                  .not_valid_before(now).not_valid_after(_NO_EXPIRY)
                  .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                  .add_extension(ca_usage, critical=True)
                  .add_extension(_ski(issuer_key.public_key()), critical=False)
                  .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                      root_key.public_key()), critical=False)
                  .sign(root_key, hashes.SHA384()))
        # Keys first, certificates last: a crash leaves no certificate without its key.
        _write_private(directory / "root.key", _key_pem(root_key))
        _write_private(directory / "issuer.key", _key_pem(issuer_key))
        (directory / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
        (directory / "issuer.pem").write_bytes(issuer.public_bytes(serialization.Encoding.PEM))
        return cls(directory), True

    def build(self, ek: TpmPublic, info: TpmInfo | None = None) -> x509.Certificate:
        """A new EK certificate for ``ek`` (no file written)."""
        info = info or TpmInfo()
        key = ek.key
        if isinstance(key, rsa.RSAPublicKey):
            encipherment, agreement = True, False
        elif isinstance(key, ec.EllipticCurvePublicKey):
            encipherment, agreement = False, True
        else:  # pragma: no cover - parse_public admits only these
            raise EkCaError(f"EK key type {type(key).__name__}")
        if not ek.object_attributes & 0x00020000 or not ek.object_attributes & 0x00010000:
            # An EK is a restricted decryption key (a storage-like key): anything else
            # is not an EK, whatever the A-VM host calls it.
            raise NotAnEk("the key is not a restricted decryption key: not an EK")
        tpm_attrs = x509.Name([
            x509.RelativeDistinguishedName([x509.NameAttribute(
                x509.ObjectIdentifier(OID_TCG_AT_TPM_MANUFACTURER), info.manufacturer)]),
            x509.RelativeDistinguishedName([x509.NameAttribute(
                x509.ObjectIdentifier(OID_TCG_AT_TPM_MODEL), info.model)]),
            x509.RelativeDistinguishedName([x509.NameAttribute(
                x509.ObjectIdentifier(OID_TCG_AT_TPM_VERSION), info.version)]),
        ])
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        usage = x509.KeyUsage(digital_signature=False, content_commitment=False,
                              key_encipherment=encipherment, data_encipherment=False,
                              key_agreement=agreement, key_cert_sign=False, crl_sign=False,
                              encipher_only=False, decipher_only=False)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # the profile's empty subject: the SAN names the TPM
            .issuer_name(self.issuer.subject)
            .public_key(key).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(_NO_EXPIRY)
            .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm_attrs)]),
                           critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [x509.ObjectIdentifier(OID_TCG_KP_EK_CERTIFICATE)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
            .add_extension(x509.UnrecognizedExtension(_OID_SUBJECT_DIRECTORY_ATTRIBUTES,
                                                      _tpm_specification(info)), critical=False)
            .sign(self._key, hashes.SHA384())
        )

    def issue(self, ek_public: bytes | TpmPublic,
              info: TpmInfo | None = None) -> tuple[x509.Certificate, bool]:
        """The EK certificate of ``ek_public`` (a TPM2B_PUBLIC); ``(cert, newly issued)``.

        A certificate this CA issued earlier for the same EK is returned again
        while it still validates: issuing is idempotent, so a deployment tool
        run twice changes nothing.
        """
        try:
            ek = ek_public if isinstance(ek_public, TpmPublic) else parse_public(ek_public)
        except QuoteError as exc:
            raise NotAnEk(f"EK public area: {exc}") from None
        issued = self.dir / "issued"
        issued.mkdir(mode=0o700, exist_ok=True)
        path = issued / f"{hashlib.sha256(ek.raw).hexdigest()}.pem"
        if path.exists():
            try:
                old = validate_ek_certificate(path.read_bytes(), [self.root, self.issuer])
            except QuoteError:
                old = None
            if old is not None and old.public_key() == ek.key:
                return old, False
        cert = self.build(ek, info)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        tmp.replace(path)
        return cert, True


__all__ = ["EkCa", "EkCaError", "NotAnEk", "TpmInfo"]
