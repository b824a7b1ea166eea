"""Stdin/stdout <-> UNIX socket relay: how tss2 3.2.1 reaches a swtpm on a UNIX socket.

tss2 3.2.1's ``swtpm:`` TCTI speaks only TCP and needs swtpm's control channel
at port + 1 as soon as it initialises (it sets the locality there): with the
control channel on a root-only UNIX socket it fails (measured: ``Failed to
connect to control socket``). Its ``cmd:`` TCTI runs a command through
``/bin/sh -c`` and exchanges TPM commands and responses with it over
stdin/stdout; this module is that command, so the TPM itself (data and
control) is reachable only through UNIX sockets whose mode decides who may use
it. Use :func:`tcti` to build the TCTI string.

swtpm serves one client connection at a time. Like the ``swtpm:`` TCTI, the
relay connects for each command and disconnects after its response, so several
TSS contexts (the agent, an enrollment, tpm2-tools) share one swtpm; a relay
holding its connection would block every other user of the TPM.

Stdlib only, and nothing else of :mod:`vims` is imported: a TSS context starts
one relay for its lifetime.
"""

from __future__ import annotations

import os
import shlex
import socket
import struct
import sys
from collections.abc import Callable

_HEADER = 10  # tag (2), size (4), command or response code (4)
_MAX_MESSAGE = 1 << 16  # above any TPM's TPM2_PT_MAX_COMMAND_SIZE / RESPONSE_SIZE


def tcti(socket_path: str, python: str | None = None) -> str:
    """The TCTI string (tpm2-pytss, tpm2-tools) of the swtpm listening at ``socket_path``."""
    exe = python or sys.executable
    # -I: neither the caller's PYTHONPATH nor the working directory decides what runs.
    return "cmd:" + " ".join(shlex.quote(a) for a in (exe, "-I", "-m", "vims.tpm.relay",
                                                       socket_path))


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes | None:
    """n bytes, or None at end of input before the first byte."""
    out = b""
    while len(out) < n:
        chunk = read(n - len(out))
        if not chunk:
            if out:
                raise ConnectionError(f"truncated TPM message ({len(out)} of {n} bytes)")
            return None
        out += chunk
    return out


def _message(read: Callable[[int], bytes]) -> bytes | None:
    """One TPM command or response: the 10-byte header gives the total size."""
    header = _read_exact(read, _HEADER)
    if header is None:
        return None
    size = struct.unpack(">I", header[2:6])[0]
    if not _HEADER <= size <= _MAX_MESSAGE:
        raise ConnectionError(f"TPM message size {size} out of range")
    body = _read_exact(read, size - _HEADER)
    if body is None and size > _HEADER:
        raise ConnectionError("TPM message without its body")
    return header + (body or b"")


def relay(socket_path: str, fd_in: int, fd_out: int) -> None:
    """Forward each command read on fd_in over a fresh connection; answer on fd_out."""
    while True:
        command = _message(lambda n: os.read(fd_in, n))
        if command is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(socket_path)
            sock.sendall(command)
            response = _message(sock.recv)
        if response is None:
            raise ConnectionError("swtpm closed the connection without a response")
        view = memoryview(response)
        while view:
            view = view[os.write(fd_out, view) :]


# TPM2_Shutdown(TPM_SU_CLEAR): tag TPM_ST_NO_SESSIONS, size 12, TPM_CC_Shutdown.
_SHUTDOWN_CLEAR = struct.pack(">HIIH", 0x8001, 12, 0x145, 0x0000)


def shutdown(socket_path: str, timeout_s: float = 5.0) -> int:
    """Send TPM2_Shutdown(CLEAR); returns the TPM's response code (0: success).

    Stop a swtpm only after this: without it the next start is an unorderly
    one, the TPM's clock falls back to its last saved value, every quote says
    ``safe = 0`` (which the REM-S refuses) and the TPM counts a failed
    authorization (three of those lock the AK out).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(socket_path)
        sock.sendall(_SHUTDOWN_CLEAR)
        response = _message(sock.recv)
    if response is None:
        raise ConnectionError("swtpm closed the connection without a response")
    return int(struct.unpack(">I", response[6:10])[0])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--shutdown"] and len(args) == 2:
        try:
            code = shutdown(args[1])
        except OSError as exc:
            print(f"vims: error: TPM socket {args[1]}: {exc}", file=sys.stderr)
            return 1
        if code != 0:
            print(f"vims: error: TPM2_Shutdown answered 0x{code:x}", file=sys.stderr)
        return 0 if code == 0 else 1
    if len(args) != 1:
        print("usage: python -m vims.tpm.relay [--shutdown] SOCKET", file=sys.stderr)
        return 2
    try:
        relay(args[0], sys.stdin.fileno(), sys.stdout.fileno())
    except OSError as exc:
        # The TSS sees its command unanswered and reports a TCTI I/O error.
        print(f"vims: error: TPM socket {args[0]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
