"""The REM-S PKI for the rems and avm roles, run with the VIMS runtime's Python.

    vims-pki.py init DIR NAME...          CA (ca.pem, ca.key) and the REM-S server cert
    vims-pki.py client DIR AVM_ID         a client cert for an A-VM (avm-ID.pem, .key)

Each step writes only what is missing, so a second run changes nothing; the
role uses ``creates:`` on the same files. Keys are written 0600.
"""

import sys
from pathlib import Path

from vims.protocol.pki import CertificateAuthority


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
        if not (root / "rems.pem").exists():
            ca.issue_server(argv[3:] or ["rems"]).write(root / "rems.pem", root / "rems.key")
        return 0
    ca = CertificateAuthority.load(cert, key)
    avm_id = argv[3]
    if not (root / f"avm-{avm_id}.pem").exists():
        ca.issue_client(avm_id).write(root / f"avm-{avm_id}.pem", root / f"avm-{avm_id}.key")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
