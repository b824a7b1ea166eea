"""Small network helpers shared by the lab, the deployment and the tests."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports are picked below the kernel's ephemeral range: a port from bind(0) can be
# taken, between our check and the server's own bind, as the source port of any
# outgoing connection (and a probe connecting to a port in that range can even
# connect to itself). Below the range only another explicit bind can race us.
LOWEST = 10000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
ATTEMPTS = 200


def _ephemeral_floor() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(count: int = 1) -> int:
    """A port P with P .. P+count-1 free on 127.0.0.1 now, outside the ephemeral range."""
    if not 1 <= count <= 16:
        raise ValueError(f"count must be 1-16, not {count}")
    top = _ephemeral_floor() - count
    for _ in range(ATTEMPTS):
        port = random.randrange(LOWEST, top) if top > LOWEST + 100 else 0
        if port == 0:  # an unusual ephemeral range: fall back to the OS's choice
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        if port + count <= 65536 and all(_bindable(p) for p in range(port, port + count)):
            return port
    raise OSError(f"no {count} free consecutive TCP port(s) on 127.0.0.1 after {ATTEMPTS} tries")
