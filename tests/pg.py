"""A private PostgreSQL server for tests, independent of any system cluster.

CI runs the tests as root on a fresh Debian machine where the ``postgresql``
package is installed but no cluster may be running (or one may be that we must
not touch). So the tests start their own server: ``initdb`` into a temporary
directory, a Unix socket in that directory and no TCP listener, run as the
``postgres`` system user when we are root (``initdb`` refuses root), and
stop and delete it all at the end, even on failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PORT = 54329  # only names the socket file: the server listens on no TCP port
START_TIMEOUT = 60.0


def server_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin that has the server programs."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if (d / "pg_ctl").exists() and (d / "postgres").exists()]

    def major(d: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", d.parent.name))

    return max(found, key=major, default=None)


class PrivatePostgres:
    """A running private server; ``new_database`` gives each test an empty database."""

    def __init__(self, bindir: Path, base: Path, as_user: list[str]) -> None:
        self.bindir, self.base, self.as_user = bindir, base, as_user
        self.data, self.sock, self.log = base / "data", base / "sock", base / "server.log"
        self._databases = 0

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program (as the server's owner); raise with its output on error."""
        cmd = [*self.as_user, str(self.bindir / args[0]), *args[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=self.base, check=False)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                               f"{proc.stdout}{proc.stderr}\nserver log:\n{log}")
        return proc

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.sock}&port={PORT}"

    def new_database(self, prefix: str = "vims") -> str:
        """Create an empty database; returns its SQLAlchemy URL."""
        self._databases += 1
        name = f"{prefix}_{self._databases}"
        self.run("createdb", "-h", str(self.sock), "-p", str(PORT), "-U", "postgres", name)
        return self.url(name)

    def start(self) -> None:
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--no-locale", "--no-sync")
        # fsync=off: throw-away data, and the tests measure locking, not disks.
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                 "-o", f"-k {self.sock} -p {PORT} -c listen_addresses='' -c fsync=off",
                 "start")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            ready = subprocess.run([str(self.bindir / "pg_isready"), "-q", "-h", str(self.sock),
                                    "-p", str(PORT), "-U", "postgres"], check=False, timeout=10)
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL not ready after {START_TIMEOUT:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server if it runs; a fast stop, then an immediate one if that fails."""
        if not (self.data / "postmaster.pid").exists():
            return
        for mode in ("fast", "immediate"):
            try:
                self.run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", mode, "stop")
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                continue


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """Start a private server for the duration of the block; skip if PostgreSQL is absent."""
    bindir = server_bin_dir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); "
                    "install the Debian package 'postgresql'")
    # Short path: the socket path must fit in sun_path (107 bytes).
    base = Path(tempfile.mkdtemp(prefix="vims-pg-", dir="/tmp" if Path("/tmp").is_dir()
                                 else None))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PrivatePostgres(bindir, base, as_user)
    try:
        server.sock.mkdir()
        if as_user:
            shutil.chown(server.sock, "postgres", "postgres")
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)

