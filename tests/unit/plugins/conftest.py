"""Unit tests of the collection: run with the controller venv (ansible-core), not the
runtime venv, and with ``--confcutdir`` here so the runtime's tests/conftest.py
(which imports ``vims``) is not loaded. ``scripts/ansible-checks.sh units`` runs them.

The collection is made importable as ``ansible_collections.vims.attestation`` through
a symlink to this checkout, the layout ansible-core's own loader expects.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
_COLLECTIONS = Path(tempfile.mkdtemp(prefix="vims-collections-"))
(_COLLECTIONS / "ansible_collections" / "vims").mkdir(parents=True)
(_COLLECTIONS / "ansible_collections" / "vims" / "attestation").symlink_to(ROOT)
sys.path.insert(0, str(_COLLECTIONS))
os.environ["ANSIBLE_COLLECTIONS_PATH"] = str(_COLLECTIONS)

RUNTIME_PY = Path(os.environ.get("VIMS_RUNTIME_VENV", ROOT / ".venv")) / "bin" / "python"
TOKEN = "unit-test-admin-token-0123456789"


def pytest_sessionfinish() -> None:
    shutil.rmtree(_COLLECTIONS, ignore_errors=True)


_REMS_SETUP = """
import sys
from pathlib import Path
from vims.lab.deploy import write_rems_config
from vims.protocol.pki import CertificateAuthority
root = Path(sys.argv[1])
pki = root / "pki"; pki.mkdir()
ca = CertificateAuthority.create()
(pki / "ca.pem").write_bytes(ca.cert_pem)
ca.issued.write(pki / "ca.pem", pki / "ca.key")
ca.issue_server(["rems", "localhost", "127.0.0.1"]).write(pki / "rems.pem", pki / "rems.key")
_, http, _gate = write_rems_config(root / "rems.toml", state=root, pki=pki,
                                   token_file=root / "admin.token", ek_ca_certs=[],
                                   pcr17_hex="00" * 32)
print(http)
"""


class Rems:
    """A REM-S over HTTPS (its CA: ``ca``), read with the operator token."""

    def __init__(self, url: str, token_file: Path, ca: Path) -> None:
        self.url = url
        self.token_file = token_file
        self.ca = ca

    def get(self, path: str) -> object:
        req = urllib.request.Request(self.url + path, headers={
            "Authorization": f"Bearer {self.token_file.read_text().strip()}"})
        ctx = ssl.create_default_context(cafile=str(self.ca))
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return json.loads(r.read())


@pytest.fixture
def rems(tmp_path: Path) -> Iterator[Rems]:
    """A real REM-S (``vims rems serve`` from the runtime venv) with no A-VM."""
    if not RUNTIME_PY.exists():
        pytest.fail(f"runtime venv missing ({RUNTIME_PY}); run scripts/setup.sh")
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    port = subprocess.run([str(RUNTIME_PY), "-c", _REMS_SETUP, str(tmp_path)], check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()
    url = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(tmp_path / "pki" / "ca.pem"))
    log = (tmp_path / "rems.log").open("wb")
    proc = subprocess.Popen([str(RUNTIME_PY), "-m", "vims.cli", "rems", "serve", "--config",
                             str(tmp_path / "rems.toml")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/openapi.json", timeout=1, context=ctx).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "rems.log").read_text()[-500:]) from None
                time.sleep(0.1)
        yield Rems(url, token_file, tmp_path / "pki" / "ca.pem")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def run_module(main: object, args: dict[str, object], *, check_mode: bool = False,
               diff: bool = False) -> tuple[bool, dict[str, object]]:
    """Run a module's main() in-process; returns (failed, result)."""
    from ansible.module_utils.testing import patch_module_args

    full = dict(args)
    full["_ansible_check_mode"] = check_mode
    full["_ansible_diff"] = diff
    capture = io.StringIO()
    with patch_module_args(full), pytest.raises(SystemExit), \
            contextlib.redirect_stdout(capture):
        main()  # type: ignore[operator]
    result: dict[str, object] = json.loads(capture.getvalue())
    return bool(result.get("failed")), result
