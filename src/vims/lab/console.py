"""Run shell commands in the lab C-VM over its serial console.

The guest runs a no-echo shell on ttyS0 (see guest/sbin/vims-console). A command
is sent base64-encoded, so any byte survives the tty line discipline, and is
framed by markers that carry a random token: the shell prints them, and the
quoting in the command line keeps the line itself from ever matching.
"""

from __future__ import annotations

import base64
import fcntl
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from vims.errors import GuestCommandError

# The tty's canonical-mode line limit is 4096 bytes; stay well under it.
MAX_COMMAND_BYTES = 2048
PACE_BYTES = 16


@dataclass(frozen=True)
class GuestResult:
    """What a command run in the guest printed and returned."""

    stdout: str
    stderr: str
    exit_code: int


def _framed(command: str, token: str) -> bytes:
    payload = base64.b64encode(command.encode()).decode()
    mark = f"__VIMS_\"\"{token}"  # the shell prints __VIMS_<token>; the line never contains it
    return (
        f"echo {payload} | base64 -d > /tmp/.vims-cmd; "
        f"echo {mark}_OUT; sh /tmp/.vims-cmd < /dev/null 2> /tmp/.vims-err; rc=$?; "
        f"echo; echo {mark}_ERR; cat /tmp/.vims-err; echo; echo {mark}_RC=$rc\n"
    ).encode()


def _parse(buf: str, token: str) -> GuestResult | None:
    m = re.search(
        rf"__VIMS_{token}_OUT\n(.*)\n__VIMS_{token}_ERR\n(.*)\n__VIMS_{token}_RC=(\d+)\n",
        buf,
        re.S,
    )
    if m is None:
        return None
    return GuestResult(stdout=m.group(1), stderr=m.group(2), exit_code=int(m.group(3)))


def run_in_guest(
    serial_socket: Path, lock_path: Path, command: str, timeout: float = 30.0,
    pace: float = 0.0,
) -> GuestResult:
    """Run ``command`` with /bin/sh in the guest and wait for it (bounded by ``timeout``).

    ``pace`` > 0 sends the line in small pieces that far apart (seconds): Xen's
    serial console drops input that arrives faster than a busy dom0 reads it.
    """
    if len(command.encode()) > MAX_COMMAND_BYTES:
        raise GuestCommandError(
            f"command is {len(command.encode())} bytes; "
            f"the console takes at most {MAX_COMMAND_BYTES}"
        )
    token = secrets.token_hex(8)
    deadline = time.monotonic() + timeout
    with lock_path.open("a") as lock:
        # One console, one client: serialise concurrent callers instead of interleaving.
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GuestCommandError("console busy: another command is running") from None
                time.sleep(0.05)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(str(serial_socket))
            except OSError as exc:
                raise GuestCommandError(f"cannot reach the guest console: {exc}") from exc
            # A fresh line first, in case a previous client left a partial one.
            line = b"\n" + _framed(command, token)
            if pace <= 0:
                sock.sendall(line)
            else:
                for pos in range(0, len(line), PACE_BYTES):
                    sock.sendall(line[pos:pos + PACE_BYTES])
                    time.sleep(pace)
            raw = b""
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    sock.sendall(b"\x03\n")  # interrupt the command; the shell survives
                    raise GuestCommandError(f"guest command timed out after {timeout:.0f} s")
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    raise GuestCommandError("guest console closed (did the guest stop?)")
                raw += chunk
                if len(raw) > 64 << 20:
                    raise GuestCommandError("guest command printed more than 64 MiB")
                result = _parse(raw.decode(errors="replace").replace("\r", ""), token)
                if result is not None:
                    return result
