"""A software TPM (swtpm) per A-VM, manufactured with EK certificates from an EK CA.

swtpm stands in for the A-VM's vTPM: on Debian there are no Xen vtpm stub
domains, and tests need many independent TPMs at once (one state dir each).

Both of swtpm's channels are UNIX sockets of mode 0600 in a directory of mode
0700: the control channel can reset the TPM and run the locality-4 hash
sequence that stands in for a DRTM launch (PCR 17), so whoever reaches it can
forge a measured launch; the data channel gives the TPM's platform hierarchy
(empty authorisation on swtpm). Only root may use either. tss2 3.2.1 reaches
the data socket through its ``cmd:`` TCTI and :mod:`vims.tpm.relay` (its
``swtpm:`` TCTI is TCP-only and needs the control channel on TCP).

Manufacturing (:meth:`Swtpm.manufacture`) with an :class:`~vims.tpm.ekca.EkCa`
is what the deployment does: EKs without certificates, certificates issued by
the CA from the EK public areas alone, written into NV. With a
:class:`LocalCa` swtpm_setup signs them itself (swtpm_localca; the CA key then
sits beside the TPM): kept for tests that need another "manufacturer".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from vims.errors import VimsError
from vims.tpm.relay import shutdown
from vims.tpm.relay import tcti as relay_tcti

if TYPE_CHECKING:
    from vims.tpm.ekca import EkCa

READY_TIMEOUT_S = 5.0


class SwtpmError(VimsError):
    """swtpm or one of its tools failed or is missing."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SwtpmError(f"{name} not found: install the swtpm and swtpm-tools packages")
    return path


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SwtpmError(f"{what} failed (exit {proc.returncode}): {tail[0]}")
    return proc


class LocalCa:
    """Our own swtpm_localca configuration: CA key and certs live in ``ca_dir``.

    The Debian defaults point at /var/lib/swtpm-localca (shared, root-owned);
    a CA per deployment (or per test) keeps EK chains separable, which the
    negative chain-validation test relies on.
    """

    def __init__(self, ca_dir: Path) -> None:
        self.ca_dir = Path(ca_dir)
        self.ca_dir.mkdir(parents=True, exist_ok=True)
        self.localca_conf = self.ca_dir / "swtpm-localca.conf"
        self.localca_options = self.ca_dir / "swtpm-localca.options"
        self.setup_conf = self.ca_dir / "swtpm_setup.conf"
        self.localca_conf.write_text(
            f"statedir = {self.ca_dir}\n"
            f"signingkey = {self.ca_dir / 'signkey.pem'}\n"
            f"issuercert = {self.ca_dir / 'issuercert.pem'}\n"
            f"certserial = {self.ca_dir / 'certserial'}\n"
        )
        self.localca_options.write_text(
            "--platform-manufacturer VIMS\n--platform-version 2.1\n--platform-model swtpm\n"
        )
        self.setup_conf.write_text(
            f"create_certs_tool = {_tool('swtpm_localca')}\n"
            f"create_certs_tool_config = {self.localca_conf}\n"
            f"create_certs_tool_options = {self.localca_options}\n"
            "active_pcr_banks = sha256\n"
        )

    @property
    def root_cert(self) -> Path:
        """Self-signed root, created by swtpm_localca on first use."""
        return self.ca_dir / "swtpm-localca-rootca-cert.pem"

    @property
    def issuer_cert(self) -> Path:
        """Intermediate that signs the EK and platform certificates."""
        return self.ca_dir / "issuercert.pem"

    @property
    def ca_cert_paths(self) -> list[Path]:
        """What a REM-S needs to validate EK chains from this CA."""
        return [self.root_cert, self.issuer_cert]


def manufacture_command(state_dir: Path) -> list[str]:
    """swtpm_setup creating the RSA-2048 and ECC P-384 EKs, persistent, without certificates."""
    return [
        _tool("swtpm_setup"), "--tpm2", "--tpmstate", str(state_dir), "--createek",
        "--pcr-banks", "sha256", "--not-overwrite",
        # Its default config names swtpm_localca as certificate tool; none is used here.
        "--config", os.devnull,
    ]  # fmt: skip


class Swtpm:
    """One swtpm process serving TPM 2.0 on root-only UNIX sockets.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. The
    sockets live in ``socket_dir`` (default: a new private directory per start;
    UNIX socket paths are limited to 107 bytes, which deep test directories exceed).
    """

    def __init__(self, state_dir: Path, ca: LocalCa | EkCa | None = None,
                 socket_dir: Path | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.ca = ca
        self._socket_dir = Path(socket_dir) if socket_dir is not None else None
        self._own_socket_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def socket_dir(self) -> Path:
        """Where the sockets are; fixed for this object, so its :attr:`tcti` stays valid."""
        if self._socket_dir is not None:
            return self._socket_dir
        if self._own_socket_dir is None:
            self._own_socket_dir = Path(tempfile.mkdtemp(prefix="vims-swtpm-"))  # mode 0700
            # Removed with this object, not at stop(): recreating a known name in /tmp
            # later could find a directory someone else made in between.
            weakref.finalize(self, shutil.rmtree, self._own_socket_dir, True)
        return self._own_socket_dir

    @property
    def data_socket(self) -> Path:
        return self.socket_dir / "swtpm.sock"

    @property
    def ctrl_socket(self) -> Path:
        return self.socket_dir / "swtpm.ctrl"

    @property
    def tcti(self) -> str:
        """TCTI string for tpm2-pytss and tpm2-tools (``cmd:`` through :mod:`vims.tpm.relay`)."""
        return relay_tcti(str(self.data_socket))

    def manufacture(self) -> None:
        """Create the EKs and their certificates in NV (0x1c00002 RSA, 0x1c00016 ECC P-384).

        With an :class:`~vims.tpm.ekca.EkCa`: swtpm_setup makes the EKs only,
        the CA certifies their public areas and the certificates are written
        into NV through a (temporarily) running swtpm. Idempotent: an existing
        state keeps its EKs, and certificates already in NV are kept.
        """
        if self.ca is None:
            raise SwtpmError("manufacturing needs an EK CA")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(self.ca, LocalCa):
            _run(
                [
                    _tool("swtpm_setup"), "--tpm2", "--tpmstate", str(self.state_dir),
                    "--create-ek-cert", "--create-platform-cert", "--overwrite",
                    "--config", str(self.ca.setup_conf),
                ],
                "swtpm_setup",
            )  # fmt: skip
            return
        _run(manufacture_command(self.state_dir), "swtpm_setup")
        was_running = self.running
        self.start()
        try:
            install_ek_certificates(self.tcti, self.ca)
        finally:
            if not was_running:
                self.stop()

    def start(self) -> Swtpm:
        """Start swtpm and wait (bounded) until its data socket accepts connections."""
        if self._proc is not None:
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (self.data_socket, self.ctrl_socket):
            path.unlink(missing_ok=True)  # left by a killed swtpm; it would refuse to bind
        cmd = [
            _tool("swtpm"), "socket", "--tpm2",
            "--server", f"type=unixio,path={self.data_socket},mode=0600",
            "--ctrl", f"type=unixio,path={self.ctrl_socket},mode=0600",
            "--tpmstate", f"dir={self.state_dir}",
            "--flags", "not-need-init,startup-clear",
        ]  # fmt: skip
        # swtpm logs each client disconnect on stderr: a pipe nobody reads would
        # fill up and block it, so it goes to a file, read when swtpm fails.
        self._log = self.socket_dir / "swtpm.log"
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                          stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise SwtpmError(f"swtpm exited at start: {self._log_tail()}")
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(self.ctrl_socket))  # not the data socket: one client
            except OSError:
                time.sleep(0.01)
                continue
            if self.data_socket.exists() and self._proc.poll() is None:
                return self
            time.sleep(0.01)
        self.stop()
        raise SwtpmError(f"swtpm not ready on {self.data_socket} after {READY_TIMEOUT_S} s")

    def _log_tail(self) -> str:
        try:
            lines = self._log.read_text(errors="replace").strip().splitlines() if self._log else []
        except OSError:
            lines = []
        return lines[-1] if lines else "no output"

    def stop(self, orderly: bool = True) -> None:
        """Shut the TPM down orderly, terminate swtpm and reap it; no process is left.

        TPM2_Shutdown first: SIGTERM alone (``orderly=False``) makes the next
        start unorderly (the clock goes back, quotes say safe = 0, which the
        REM-S refuses, and a failed authorization is counted).
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            if orderly and proc.poll() is None:
                with contextlib.suppress(OSError):
                    shutdown(str(self.data_socket), timeout_s=2.0)
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL swtpm (a crash: no state saved on the way out), keeping its sockets' place."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ioctl(self, *args: str) -> None:
        _run([_tool("swtpm_ioctl"), "--unix", str(self.ctrl_socket), *args], "swtpm_ioctl")

    def drtm_measure(self, data: bytes) -> bytes:
        """Run a locality-4 hash sequence (a TXT/tboot DRTM stand-in); return the new PCR17.

        The TPM resets PCR17 to zeros and extends SHA256(data), so the expected
        value is SHA256(0^32 || SHA256(data)), computable by the REM-S offline.
        swtpm counts the sequence as a TPM restart: restartCount goes up by one.
        """
        if b"\0" in data:
            raise SwtpmError("DRTM data is passed on swtpm_ioctl's command line: no NUL bytes")
        self._ioctl("-h", os.fsdecode(data))
        return hashlib.sha256(b"\0" * 32 + hashlib.sha256(data).digest()).digest()

    def reinit(self) -> None:
        """CMD_INIT over the control channel: the TPM must get TPM2_Startup again.

        With Startup(CLEAR) that is a TPM reset (resetCount + 1); unless
        TPM2_Shutdown came first it also counts as an unorderly shutdown.
        """
        self._ioctl("-i")

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def install_ek_certificates(tcti: str, ca: EkCa) -> dict[str, bool]:
    """Certify the TPM's EKs with ``ca`` and write the certificates into NV.

    In one process, for tests and the one-machine lab; a deployment runs the
    same three steps on two hosts (``vims tpm ek-public`` on the A-VM host,
    ``vims tpm ek-ca issue`` on the REM-S host, ``vims tpm ek-cert install``
    back on the A-VM host). Returns, per EK, whether NV changed.
    """
    from cryptography.hazmat.primitives import serialization

    from vims.tpm.attester import NV_EK_CERT_ECC, NV_EK_CERT_RSA2048, Attester
    from vims.tpm.ekca import TpmInfo

    changed: dict[str, bool] = {}
    with Attester(tcti) as tpm:
        info = TpmInfo(**tpm.tpm_info())  # type: ignore[arg-type]
        for kind, public, index in (("rsa", tpm.ek_public(), NV_EK_CERT_RSA2048),
                                    ("ecc", tpm.ecc_ek_public(), NV_EK_CERT_ECC)):
            cert, _ = ca.issue(public, info)
            changed[kind] = tpm.install_ek_certificate(
                cert.public_bytes(serialization.Encoding.DER), index)
    return changed
