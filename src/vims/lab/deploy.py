"""VIMS on one machine: REM-S, an A-VM agent with its own swtpm, and the lab C-VM.

Creates everything a real deployment has — the REM-S CA and certificates, a
manufactured vTPM with EK certificates from the REM-S's EK CA, a simulated DRTM launch
measurement in PCR 17 (what tboot does on TXT hardware), configuration files,
and, as an operator would over the REM-S API (HTTPS), the C-VM bound to its
A-VM, the digests of what the A-VM measures approved, and a single-use
enrollment token for the A-VM's enrollment — under one directory, and runs the
REM-S and agent as the CLI would (separate processes). The gate side asks the
REM-S over its plain loopback listener, as the nginx gate does.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import ssl
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
from vims.tpm.ekca import EkCa
from vims.tpm.swtpm import Swtpm

LAUNCH_DATA = b"vims lab measured launch: tboot + xen + dom0 (simulated DRTM)"


@dataclass
class LabDeployment:
    root: Path
    avm_id: str
    cvm: str
    http_url: str  # the REM-S API over HTTPS (its CA: pki/ca.pem)
    gate_url: str  # the plain loopback listener the gate asks for decisions
    admin_token: str
    swtpm: Swtpm
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # A further A-VM of the same deployment keeps its files (config, TPM, key) here.
    avm_dir: Path | None = None

    @property
    def ca(self) -> Path:
        return self.root / "pki" / "ca.pem"

    def tls(self) -> ssl.SSLContext:
        """An HTTPS client context that trusts the REM-S CA."""
        return ssl.create_default_context(cafile=str(self.ca))

    @property
    def rems_config(self) -> Path:
        return self.root / "rems.toml"

    @property
    def avm_root(self) -> Path:
        return self.avm_dir or self.root

    @property
    def avm_config(self) -> Path:
        return self.avm_root / "avm.toml"

    @property
    def avm_process(self) -> str:
        """The A-VM agent's process (and log) name: ``avm``, or ``avm-ID`` for another."""
        return "avm" if self.avm_dir is None else f"avm-{self.avm_id}"

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
                urllib.request.urlopen(self.http_url + "/openapi.json", timeout=1,
                                       context=self.tls()).close()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise VimsError(f"REM-S not answering on {self.http_url}")

    def measurements(self) -> list[dict[str, str]]:
        """``vims avm measure``: what the agent will measure into PCR 23."""
        done = subprocess.run(
            [sys.executable, "-m", "vims.cli", "avm", "measure", "--config",
             str(self.avm_config), "--format", "json"], capture_output=True, text=True,
            timeout=120, check=False, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise VimsError(f"vims avm measure failed: {done.stderr.strip()}")
        events: list[dict[str, str]] = json.loads(done.stdout)
        return events

    def register(self) -> None:
        """The operator's part: bind the C-VM to this A-VM, approve what it measures."""
        self._ok("PUT", f"/v1/cvms/{self.cvm}/avm", {"avm": self.avm_id})
        for e in self.measurements():
            self._ok("PUT", f"/v1/{e['scope']}s/{e['subject']}/references/{e['kind']}",
                     {"digest": e["digest"]})

    def _ok(self, method: str, path: str, body: object) -> dict[str, object]:
        status, raw = self.call(method, path, json.dumps(body).encode())
        if status != 200:
            raise VimsError(f"REM-S {method} {path}: HTTP {status}: {raw[:200]!r}")
        answer: dict[str, object] = json.loads(raw)
        return answer

    def enroll(self) -> dict[str, object]:
        """``vims avm enroll`` with a single-use enrollment token the operator made."""
        token = self._ok("POST", "/v1/tokens", {"scope": "enroll", "avm": self.avm_id,
                                                "ttl_s": 600})["token"]
        token_file = self.avm_root / "enroll.token"
        token_file.write_text(f"{token}\n")
        done = subprocess.run(
            [sys.executable, "-m", "vims.cli", "avm", "enroll", "--config", str(self.avm_config),
             "--rems-url", self.http_url, "--token-file", str(token_file),
             "--format", "json"], capture_output=True, text=True, timeout=120, check=False,
            stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise VimsError(f"A-VM enrollment failed: {done.stderr.strip() or done.stdout}")
        result: dict[str, object] = json.loads(done.stdout)
        return result

    def start_avm(self, register: bool = True) -> None:
        """Start the agent: registered at the REM-S, and enrolled if it has no certificate."""
        if register:
            self.register()
        if not (self.avm_root / "pki" / "avm.pem").exists():
            self.enroll()
        self._spawn(self.avm_process, ["avm", "run", "--config", str(self.avm_config), "-v"])

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
            with urllib.request.urlopen(req, timeout=timeout, context=self.tls()) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def put(self, path: str, body: bytes) -> int:
        return self.call("PUT", path, body)[0]

    def decision(self) -> int:
        """The gate's question, on the REM-S's loopback gate listener."""
        try:
            with urllib.request.urlopen(f"{self.gate_url}/v1/decision/{self.cvm}",
                                        timeout=5) as r:
                status: int = r.status
                return status
        except urllib.error.HTTPError as e:
            return e.code

    def add_avm(self, avm_id: str, cvm: str, *, ram: Path, profile: Path,
                baseline: Path | None, local_policy: Path | None) -> LabDeployment:
        """Another A-VM of this deployment (same REM-S), with a TPM of its own made by
        the same EK CA and the same measured launch; it guards *cvm* at *ram*.

        Nothing is registered for it at the REM-S: that is the operator's call
        (:meth:`register`, or only :meth:`enroll` for an A-VM no C-VM is bound to).
        """
        avm_dir = self.root / avm_id
        (avm_dir / "pki").mkdir(parents=True)
        shutil.copy(self.ca, avm_dir / "pki" / "ca.pem")
        swtpm = Swtpm(avm_dir / "swtpm", EkCa.init(self.root / "rems-ek-ca")[0])
        swtpm.manufacture()
        swtpm.start()
        try:
            swtpm.drtm_measure(LAUNCH_DATA)
            write_avm_config(avm_dir / "avm.toml", avm_id=avm_id, cvm=cvm,
                             channel=self.channel_port(), pki=avm_dir / "pki", tcti=swtpm.tcti,
                             ram=ram, profile=profile, baseline=baseline,
                             local_policy=local_policy, models=avm_dir / "models")
        except BaseException:
            swtpm.stop()
            raise
        return LabDeployment(root=self.root, avm_id=avm_id, cvm=cvm, http_url=self.http_url,
                             gate_url=self.gate_url, admin_token=self.admin_token, swtpm=swtpm,
                             avm_dir=avm_dir)

    def channel_port(self) -> int:
        for line in self.rems_config.read_text().splitlines():
            if line.startswith("channel_listen"):
                return int(line.split("=", 1)[1].strip().strip('"').rsplit(":", 1)[1])
        raise VimsError(f"{self.rems_config}: no channel_listen")

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        self.swtpm.stop()


def write_rems_config(path: Path, *, state: Path, pki: Path, token_file: Path,
                      ek_ca_certs: list[Path], pcr17_hex: str, verdict_ttl_s: float = 10,
                      ) -> tuple[int, int, int]:
    """The REM-S config of a one-machine deployment; returns (channel, HTTPS, gate) ports.

    ``state`` holds the database and EAR key, ``pki`` the CA and server certificates
    as :func:`deploy` writes them.
    """
    channel, http, gate = free_port(), free_port(), free_port()
    path.write_text(f"""[rems]
database = "sqlite:///{state / 'rems.db'}"
http_listen = "127.0.0.1:{http}"
gate_listen = "127.0.0.1:{gate}"
channel_listen = "127.0.0.1:{channel}"
audit_checkpoint_file = "{state / 'audit-checkpoints.jsonl'}"
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
    return channel, http, gate


def write_rems_pki(pki: Path) -> CertificateAuthority:
    """A new REM-S CA and server certificate, laid out as :func:`write_rems_config` reads."""
    pki.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create()
    ca.issued.write(pki / "ca.pem", pki / "ca.key")
    ca.issue_server(["rems", "localhost", "127.0.0.1"]).write(pki / "rems.pem",
                                                              pki / "rems.key")
    return ca


def write_avm_config(path: Path, *, avm_id: str, cvm: str, channel: int, pki: Path, tcti: str,
                     ram: Path, profile: Path, baseline: Path | None, local_policy: Path | None,
                     models: Path, gdb: Path | None = None) -> None:
    """An A-VM agent's config: its key and certificate in *pki* (made at enrollment)."""
    optional = "".join(f'{k} = "{v}"\n' for k, v in (("baseline", baseline),
                                                      ("policy", local_policy),
                                                      ("gdb", gdb)) if v)
    models.mkdir(exist_ok=True)
    path.write_text(f"""[avm]
avm_id = "{avm_id}"
rems = "127.0.0.1:{channel}"
rems_name = "rems"
cert = "{pki / 'avm.pem'}"
key = "{pki / 'avm.key'}"
ca = "{pki / 'ca.pem'}"
tpm_tcti = "{tcti}"
models_dir = "{models}"

[[avm.cvms]]
name = "{cvm}"
memory = "{ram}"
profile = "{profile}"
{optional}""")


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

    # The EK CA is the REM-S's (its key never beside the A-VM's TPM state): the
    # swtpm gets EKs only, and the CA certifies their public areas into NV.
    tpm_ca, _ = EkCa.init(root / "rems-ek-ca")
    swtpm = Swtpm(root / "swtpm", tpm_ca)
    swtpm.manufacture()
    swtpm.start()
    try:
        pcr17 = swtpm.drtm_measure(LAUNCH_DATA)
        channel, http, gate = write_rems_config(
            root / "rems.toml", state=root, pki=pki, token_file=root / "admin.token",
            ek_ca_certs=tpm_ca.ca_cert_paths, pcr17_hex=pcr17.hex())
        write_avm_config(root / "avm.toml", avm_id=avm_id, cvm=cvm, channel=channel, pki=pki,
                         tcti=swtpm.tcti, ram=ram, profile=profile, baseline=baseline,
                         local_policy=local_policy, gdb=gdb, models=root / "models")
    except BaseException:
        swtpm.stop()
        raise
    return LabDeployment(root=root, avm_id=avm_id, cvm=cvm, http_url=f"https://127.0.0.1:{http}",
                         gate_url=f"http://127.0.0.1:{gate}", admin_token=token, swtpm=swtpm)


def cleanup(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
