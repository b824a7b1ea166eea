"""QMP access to a lab's QEMU, through the QEMU project's own client (qemu.qmp)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from qemu.qmp import legacy

from vims.errors import LabError


def qmp_command(socket_path: Path, command: str, timeout: float = 10.0, **args: Any) -> Any:
    """Run one QMP command and return its ``return`` value.

    A connection per command: QMP sockets accept one client at a time, and
    labs are driven from separate CLI processes.
    """
    if not socket_path.exists():
        raise LabError(f"QMP socket {socket_path} is missing (is the lab running?)")
    client = legacy.QEMUMonitorProtocol(str(socket_path))
    client.settimeout(timeout)
    try:
        client.connect()
        return client.cmd(command, **args)
    except LabError:
        raise
    except Exception as exc:  # the library raises several unrelated types
        raise LabError(f"QMP {command} on {socket_path}: {exc or type(exc).__name__}") from exc
    finally:
        with contextlib.suppress(Exception):
            client.close()
