"""A software TPM (swtpm) per A-VM, manufactured with EK certificates from a local CA.

swtpm stands in for the A-VM's vTPM: on Debian there are no Xen vtpm stub
domains, and tests need many independent TPMs at once (one state dir and TCP
port pair each).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from vims.errors import VimsError
from vims.net import free_port

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


class Swtpm:
    """One swtpm process serving TPM 2.0 over TCP on 127.0.0.1.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, state_dir: Path, ca: LocalCa | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.ca = ca
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def ctrl_port(self) -> int:
        return self.port + 1

    @property
    def tcti(self) -> str:
        """TCTI string for tpm2-pytss and tpm2-tools (``mssim:`` fails with swtpm 0.7.1)."""
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def manufacture(self) -> None:
        """Create RSA-2048 and ECC P-384 EKs with certificates in NV (0x1c00002, 0x1c00016)."""
        if self.ca is None:
            raise SwtpmError("manufacturing needs a LocalCa")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _run(
            [
                _tool("swtpm_setup"), "--tpm2", "--tpmstate", str(self.state_dir),
                "--create-ek-cert", "--create-platform-cert", "--overwrite",
                "--config", str(self.ca.setup_conf),
            ],
            "swtpm_setup",
        )  # fmt: skip

    def start(self) -> Swtpm:
        """Start swtpm and wait (bounded) until its TPM port accepts connections."""
        if self._proc is not None:
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.port = free_port(2)  # the swtpm TCTI finds the control channel at port + 1
            # The control socket is ours, listening before swtpm starts, so no other
            # process can take it in between; swtpm binds the TPM port itself (its
            # --server fd= is a connected socket, not a listening one).
            ctrl = socket.socket()
            ctrl.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ctrl.bind(("127.0.0.1", self.ctrl_port))
            ctrl.listen()
        except OSError as exc:
            raise SwtpmError(f"no TCP ports for swtpm on 127.0.0.1: {exc}") from None
        with ctrl:
            cmd = [
                _tool("swtpm"), "socket", "--tpm2",
                "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl", f"type=tcp,fd={ctrl.fileno()}",
                "--tpmstate", f"dir={self.state_dir}",
                "--flags", "not-need-init,startup-clear",
            ]  # fmt: skip
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, pass_fds=(ctrl.fileno(),))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise SwtpmError(f"swtpm exited at start: {err.strip() or 'no output'}")
            try:  # the TPM port: the one swtpm binds (it exits if it cannot)
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.01)
                continue
            if self._proc.poll() is None:
                return self
        self.stop()
        raise SwtpmError(f"swtpm not ready on port {self.port} after {READY_TIMEOUT_S} s")

    def stop(self) -> None:
        """Terminate swtpm and reap it; no process is left behind."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ioctl(self, *args: str) -> None:
        _run([_tool("swtpm_ioctl"), "--tcp", f"127.0.0.1:{self.ctrl_port}", *args], "swtpm_ioctl")

    def drtm_measure(self, data: bytes) -> bytes:
        """Run a locality-4 hash sequence (a TXT/tboot DRTM stand-in); return the new PCR17.

        The TPM resets PCR17 to zeros and extends SHA256(data), so the expected
        value is SHA256(0^32 || SHA256(data)), computable by the REM-S offline.
        """
        if b"\0" in data:
            raise SwtpmError("DRTM data is passed on swtpm_ioctl's command line: no NUL bytes")
        self._ioctl("-h", os.fsdecode(data))
        return hashlib.sha256(b"\0" * 32 + hashlib.sha256(data).digest()).digest()

    def reinit(self) -> None:
        """CMD_INIT over the control channel: a TPM restart (new restartCount/resetCount)."""
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
