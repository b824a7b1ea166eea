"""VIMS on one machine: REM-S, an A-VM agent with its own swtpm, and the lab C-VM.

Creates everything a real deployment has — the REM-S CA and certificates, a
manufactured vTPM with EK certificates from a local CA, a simulated DRTM launch
measurement in PCR 17 (what tboot does on TXT hardware), configuration files,
the enrollment of the A-VM's AK over the REM-S API — under one directory, and
runs the REM-S and agent as the CLI would (separate processes).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vims.errors import VimsError
from vims.net import free_port
from vims.protocol.pki import CertificateAuthority
from vims.tpm.swtpm import LocalCa, Swtpm

LAUNCH_DATA = b"vims lab measured launch: tboot + xen + dom0 (simulated DRTM)"


@dataclass
class LabDeployment:
    root: Path
    avm_id: str
    cvm: str
    http_url: str
    admin_token: str
    swtpm: Swtpm
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def rems_config(self) -> Path:
        return self.root / "rems.toml"

    @property
    def avm_config(self) -> Path:
        return self.root / "avm.toml"

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "vims.cli", *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)

    def start_rems(self, timeout: float = 30.0) -> None:
        self._spawn("rems", ["rems", "serve", "--config", str(self.rems_config), "-v"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["rems"].poll() is not None:
                raise VimsError(f"REM-S exited; see {self.root / 'rems.log'}")
            try:
                urllib.request.urlopen(self.http_url + "/openapi.json", timeout=1).close()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise VimsError(f"REM-S not answering on {self.http_url}")

    def enroll(self) -> dict[str, object]:
        """``vims avm enroll`` against the running REM-S: EK chain, AK, client certificate."""
        done = subprocess.run(
            [sys.executable, "-m", "vims.cli", "avm", "enroll", "--config", str(self.avm_config),
             "--rems-url", self.http_url, "--token-file", str(self.root / "admin.token"),
             "--format", "json"], capture_output=True, text=True, timeout=120, check=False,
            stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise VimsError(f"A-VM enrollment failed: {done.stderr.strip() or done.stdout}")
        result: dict[str, object] = json.loads(done.stdout)
        return result

    def start_avm(self) -> None:
        """Start the agent, enrolling it first if it has no certificate yet."""
        if not (self.root / "pki" / "avm.pem").exists():
            self.enroll()
        self._spawn("avm", ["avm", "run", "--config", str(self.avm_config), "-v"])

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def call(self, method: str, path: str, body: bytes = b"{}", timeout: float = 10.0,
             token: str | None = None) -> tuple[int, bytes]:
        """An operator's API call (bearer token): status and body, errors included."""
        headers = {"Authorization": f"Bearer {token if token is not None else self.admin_token}",
                   "Content-Type": "application/json"}
        req = urllib.request.Request(self.http_url + path, data=body or None, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def put(self, path: str, body: bytes) -> int:
        return self.call("PUT", path, body)[0]

    def decision(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v1/decision/{self.cvm}",
                                        timeout=5) as r:
                status: int = r.status
                return status
        except urllib.error.HTTPError as e:
            return e.code

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        self.swtpm.stop()


def write_rems_config(path: Path, *, state: Path, pki: Path, token_file: Path,
                      ek_ca_certs: list[Path], pcr17_hex: str, verdict_ttl_s: float = 10,
                      ) -> tuple[int, int]:
    """The REM-S config of a one-machine deployment; returns (channel, HTTP) ports.

    ``state`` holds the database and EAR key, ``pki`` the CA and server certificates
    as :func:`deploy` writes them.
    """
    channel, http = free_port(), free_port()
    path.write_text(f"""[rems]
database = "sqlite:///{state / 'rems.db'}"
http_listen = "127.0.0.1:{http}"
channel_listen = "127.0.0.1:{channel}"
admin_token_file = "{token_file}"
signing_key = "{state / 'ear-key.pem'}"
verdict_ttl_s = {verdict_ttl_s}
ek_ca_certs = [{", ".join(f'"{p}"' for p in ek_ca_certs)}]
golden_pcrs = {{ "17" = "{pcr17_hex}" }}

[rems.tls]
ca_cert = "{pki / 'ca.pem'}"
ca_key = "{pki / 'ca.key'}"
server_cert = "{pki / 'rems.pem'}"
server_key = "{pki / 'rems.key'}"
""")
    return channel, http


def write_rems_pki(pki: Path) -> CertificateAuthority:
    """A new REM-S CA and server certificate, laid out as :func:`write_rems_config` reads."""
    pki.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create()
    ca.issued.write(pki / "ca.pem", pki / "ca.key")
    ca.issue_server(["rems", "localhost"]).write(pki / "rems.pem", pki / "rems.key")
    return ca


def deploy(root: Path, *, ram: Path, profile: Path, baseline: Path | None,
           local_policy: Path | None, avm_id: str = "avm1", cvm: str = "cvm1",
           gdb: Path | None = None) -> LabDeployment:
    """Create the REM-S and A-VM configuration under ``root``.

    ``gdb`` is the C-VM's gdbstub socket: with it the A-VM can trace system calls
    (behaviour.trace) with the models it finds in ``root/models``.

    The A-VM is enrolled over the REM-S API by :meth:`LabDeployment.start_avm`
    (its key is created then and its certificate issued by the REM-S CA).
    """
    root.mkdir(parents=True, exist_ok=True)
    pki = root / "pki"
    write_rems_pki(pki)
    token = secrets.token_hex(24)
    (root / "admin.token").write_text(token + "\n")
    (root / "admin.token").chmod(0o600)

    tpm_ca = LocalCa(root / "tpm-ca")
    swtpm = Swtpm(root / "swtpm", tpm_ca)
    swtpm.manufacture()
    swtpm.start()
    try:
        pcr17 = swtpm.drtm_measure(LAUNCH_DATA)
        channel, http = write_rems_config(
            root / "rems.toml", state=root, pki=pki, token_file=root / "admin.token",
            ek_ca_certs=tpm_ca.ca_cert_paths, pcr17_hex=pcr17.hex())
        optional = "".join(f'{k} = "{v}"\n' for k, v in (("baseline", baseline),
                                                          ("policy", local_policy),
                                                          ("gdb", gdb)) if v)
        (root / "models").mkdir(exist_ok=True)
        (root / "avm.toml").write_text(f"""[avm]
avm_id = "{avm_id}"
rems = "127.0.0.1:{channel}"
rems_name = "rems"
cert = "{pki / 'avm.pem'}"
key = "{pki / 'avm.key'}"
ca = "{pki / 'ca.pem'}"
tpm_tcti = "{swtpm.tcti}"
models_dir = "{root / 'models'}"

[[avm.cvms]]
name = "{cvm}"
memory = "{ram}"
profile = "{profile}"
{optional}""")
    except BaseException:
        swtpm.stop()
        raise
    return LabDeployment(root=root, avm_id=avm_id, cvm=cvm, http_url=f"http://127.0.0.1:{http}",
                         admin_token=token, swtpm=swtpm)


def cleanup(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
