"""An nginx gate in front of a protected service, using ``auth_request``.

Each C-VM reaches the gate on an address of its own (here a port per C-VM; in
production its source address or VPN identity), which names it to the REM-S:
every request triggers a sub-request to ``GET /v1/decision/<cvm>``, and nginx
passes the request on only when the REM-S answers 200 (trusted, fresh
verdict); 403 (untrusted, stale, unknown) or an unreachable REM-S deny it —
the gate fails closed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vims.errors import VimsError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class GateError(VimsError):
    """The gate cannot be configured or started."""


@dataclass(frozen=True)
class GateRoute:
    """C-VM ``cvm`` arrives at ``listen`` (host:port)."""

    cvm: str
    listen: str


def render(routes: list[GateRoute], rems_url: str, content_root: Path, prefix: Path) -> str:
    """The nginx configuration for a gate (a whole nginx.conf, run with ``-p prefix``)."""
    if not routes:
        raise GateError("a gate needs at least one C-VM route")
    if not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+$", rems_url):
        raise GateError(f"bad REM-S URL {rems_url!r} (scheme://host:port, no path)")
    servers = []
    for r in routes:
        if not NAME_RE.match(r.cvm):
            raise GateError(f"bad C-VM name {r.cvm!r}")
        if not re.match(r"^[0-9A-Za-z.\-\[\]:]+:\d{1,5}$", r.listen):
            raise GateError(f"bad listen address {r.listen!r}")
        servers.append(f"""
    server {{
        listen {r.listen};
        set $vims_cvm {r.cvm};
        location / {{
            auth_request /_vims_decision;
            auth_request_set $vims_status $upstream_http_x_vims_status;
            add_header X-VIMS-Status $vims_status always;
            root {content_root};
        }}
        location = /_vims_decision {{
            internal;
            proxy_pass {rems_url}/v1/decision/$vims_cvm;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_connect_timeout 2s;
            proxy_read_timeout 2s;
        }}
    }}""")
    return f"""# VIMS gate (vims.gate.nginx): a C-VM passes only with a fresh, trusted verdict.
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type text/html;
{"".join(servers)}
}}
"""


class NginxGate:
    """A private nginx instance (own prefix, own config), started and stopped here."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.conf = prefix / "nginx.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise GateError("nginx is not installed (Debian package nginx)")
        self.binary = binary

    def configure(self, routes: list[GateRoute], rems_url: str, content_root: Path) -> None:
        """Write and validate the config (``nginx -t``); a bad one is never installed."""
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        candidate = self.prefix / "nginx.conf.new"
        candidate.write_text(render(routes, rems_url, content_root, self.prefix))
        test = subprocess.run([self.binary, "-t", "-q", "-p", str(self.prefix), "-c",
                               str(candidate)], capture_output=True, text=True, check=False)
        if test.returncode != 0:
            candidate.unlink()
            raise GateError(f"nginx rejected the gate config: {test.stderr.strip()[-300:]}")
        candidate.replace(self.conf)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)  # reload without dropping connections

    def start(self, wait_url: str | None = None, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(self.conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while wait_url and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise GateError(f"nginx exited: {err.strip()[-300:]}")
            try:
                urllib.request.urlopen(wait_url, timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means nginx is serving
            except OSError:
                time.sleep(0.05)
        if wait_url:
            self.stop()
            raise GateError(f"nginx gate not answering on {wait_url} after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
