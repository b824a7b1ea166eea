"""The REM-S PKI for the rems and avm roles, run with the VIMS runtime's Python.

    vims-pki.py init DIR NAME...          CA (ca.pem, ca.key) and the REM-S server cert
    vims-pki.py client DIR AVM_ID         a client cert for an A-VM (avm-ID.pem, .key)

Each step writes only what is missing (and prints "issued" when it wrote), so a
second run changes nothing. The server certificate is issued again when it does
not name every NAME (hostnames and IP addresses the channel and the HTTPS API
are reached at). Keys are written 0600.
"""

import ipaddress
import sys
from pathlib import Path

from cryptography import x509

from vims.protocol.pki import CertificateAuthority


def _names(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(san.get_values_for_type(x509.DNSName))
    return names | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def _canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] not in ("init", "client"):
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[2])
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = root / "ca.pem", root / "ca.key"
    if argv[1] == "init":
        if not cert.exists():
            ca = CertificateAuthority.create()
            ca.issued.write(cert, key)
        ca = CertificateAuthority.load(cert, key)
        wanted = [_canonical(n) for n in argv[3:]] or ["rems"]
        server = root / "rems.pem"
        if not server.exists() or not set(wanted) <= _names(server):
            ca.issue_server(wanted).write(server, root / "rems.key")
            print("issued")
        return 0
    ca = CertificateAuthority.load(cert, key)
    avm_id = argv[3]
    if not (root / f"avm-{avm_id}.pem").exists():
        ca.issue_client(avm_id).write(root / f"avm-{avm_id}.pem", root / f"avm-{avm_id}.key")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
