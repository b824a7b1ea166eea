"""A small CA for the control channel: the REM-S CA, server and A-VM client certificates.

mTLS gives the channel its first identity: the A-VM's client certificate names
its avm_id (subject CN and a ``urn:vims:avm:`` URI SAN), and the transport
refuses a hello that names another A-VM. The vTPM evidence then proves what
runs behind that identity. Keys are EC P-256; contexts are TLS 1.3 only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "AVM_URI_PREFIX",
    "CertificateAuthority",
    "IssuedCert",
    "client_context",
    "load_or_create_key",
    "peer_avm_id",
    "server_context",
]

AVM_URI_PREFIX = "urn:vims:avm:"


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write atomically (temp file + rename), never more readable than *mode* on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An EC P-256 private key from PEM, created (0600) when the file does not exist."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return key


@dataclass(frozen=True)
class IssuedCert:
    """A certificate and its private key, with PEM writers."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write PEM files; the key is created 0600 so it is never world-readable."""
        cert_path.write_bytes(self.cert_pem)
        key_path.touch(mode=0o600, exist_ok=True)
        key_path.chmod(0o600)
        key_path.write_bytes(self.key_pem)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateAuthority:
    """The REM-S CA (EC P-256): issues the server's and every A-VM's certificate."""

    def __init__(self, issued: IssuedCert) -> None:
        self.issued = issued

    @property
    def cert(self) -> x509.Certificate:
        return self.issued.cert

    @property
    def cert_pem(self) -> bytes:
        return self.issued.cert_pem

    @classmethod
    def create(cls, name: str = "VIMS REM-S CA", *, days: int = 3650) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(IssuedCert(cert, key))

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an EC private key")
        return cls(IssuedCert(cert, key))

    def _certify(
        self,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        public_key: ec.EllipticCurvePublicKey,
        not_before: dt.datetime | None,
        days: float,
    ) -> x509.Certificate:
        start = not_before or (_now() - dt.timedelta(minutes=5))
        ca_key = self.issued.key
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )

    def _issue(
        self,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        not_before: dt.datetime | None,
        days: float,
    ) -> IssuedCert:
        key = ec.generate_private_key(ec.SECP256R1())
        return IssuedCert(
            self._certify(common_name, sans, usage, key.public_key(), not_before, days), key
        )

    def issue_server(
        self,
        hostnames: list[str],
        *,
        days: float = 397,
        not_before: dt.datetime | None = None,
    ) -> IssuedCert:
        """The REM-S certificate; names that parse as IP addresses become IP SANs."""
        sans: list[x509.GeneralName] = []
        for name in hostnames:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        return self._issue(hostnames[0], sans, ExtendedKeyUsageOID.SERVER_AUTH, not_before, days)

    def issue_client(
        self,
        avm_id: str,
        *,
        days: float = 397,
        not_before: dt.datetime | None = None,
    ) -> IssuedCert:
        """An A-VM certificate naming *avm_id* (CN and URI SAN); backdate to test expiry."""
        return self._issue(avm_id, _avm_sans(avm_id), ExtendedKeyUsageOID.CLIENT_AUTH,
                           not_before, days)

    def certify_client(self, avm_id: str, public_key: object, *, days: float = 397
                       ) -> x509.Certificate:
        """An A-VM certificate for a key the A-VM keeps (from its CSR at enrollment).

        Only the identity the REM-S authenticated (*avm_id*) goes in, never the
        CSR's own subject. EC P-256 keys only, like every key of the channel.
        """
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
                public_key.curve, ec.SECP256R1):
            raise ValueError("A-VM keys must be EC P-256")
        return self._certify(avm_id, _avm_sans(avm_id), ExtendedKeyUsageOID.CLIENT_AUTH,
                             public_key, None, days)


def _avm_sans(avm_id: str) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(AVM_URI_PREFIX + avm_id)]


def _tls13(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def server_context(cert_path: Path, key_path: Path, ca_path: Path) -> ssl.SSLContext:
    """REM-S side: TLS 1.3 only, client certificates from *ca_path* required."""
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cafile=ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert_path: Path, key_path: Path, ca_path: Path) -> ssl.SSLContext:
    """A-VM side: TLS 1.3 only, the REM-S verified against *ca_path* and its hostname."""
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cafile=ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    return ctx


def peer_avm_id(peercert: object) -> str | None:
    """The avm_id of a verified client certificate (``SSLSocket.getpeercert()``).

    The CN and the URI SAN must agree when both are present: a certificate that
    says two things names no one.
    """
    if not isinstance(peercert, dict):
        return None
    cn = None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
    uris = [
        value[len(AVM_URI_PREFIX):]
        for kind, value in peercert.get("subjectAltName", ())
        if kind == "URI" and value.startswith(AVM_URI_PREFIX)
    ]
    if len(uris) > 1 or (uris and cn is not None and uris[0] != cn):
        return None
    return uris[0] if uris else cn
