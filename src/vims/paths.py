"""Where VIMS keeps caches, run-time state and guest RAM files.

All three can be moved with environment variables so that tests, CI and
several users on one host do not step on each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Downloaded kernels and built images (``$VIMS_CACHE`` or ``~/.cache/vims``)."""
    env = os.environ.get("VIMS_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "vims"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir() -> Path:
    """Per-lab state, sockets and logs (``$VIMS_RUN_DIR``, else /run/vims for root)."""
    env = os.environ.get("VIMS_RUN_DIR")
    if env:
        path = Path(env)
    elif os.geteuid() == 0:
        path = Path("/run/vims")
    else:
        path = Path(os.environ.get("XDG_RUNTIME_DIR", f"/tmp/vims-{os.geteuid()}")) / "vims"
    path.mkdir(parents=True, exist_ok=True)
    return path


def shm_dir() -> Path:
    """Directory for guest RAM files: tmpfs so that the mapping is cheap (``$VIMS_SHM_DIR``)."""
    return Path(os.environ.get("VIMS_SHM_DIR", "/dev/shm"))
