"""The nginx gate against a real nginx and the REM-S HTTP API on a real socket."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec

from vims.gate.nginx import GateError, GateRoute, NginxGate, render
from vims.net import free_port
from vims.rems.api import create_app
from vims.rems.service import RemsService
from vims.rems.store import GENESIS, Store

pytestmark = pytest.mark.slow


@pytest.fixture
def rems(tmp_path: Path) -> Iterator[tuple[RemsService, str]]:
    service = RemsService(Store(f"sqlite:///{tmp_path / 'r.db'}"),
                          ec.generate_private_key(ec.SECP256R1()))
    service.store.put_policy("fast", {"checks": [{"id": "kernel.syscall_table",
                                                  "interval_s": 0.5}],
                                      "stale_after_intervals": 3})
    service.store.assign("cvm1", "fast")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, "token"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield service, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def report(hooked: bool = False) -> dict[str, Any]:
    findings = [{"check": "kernel.syscall_table", "severity": "critical",
                 "summary": "syscall 39 hooked"}] if hooked else []
    return {"result": "fail" if hooked else "pass", "findings": findings, "processes": [],
            "checks": [{"id": "kernel.syscall_table", "category": "executables",
                        "status": "fail" if hooked else "pass"}]}


@pytest.fixture
def content() -> Iterator[Path]:
    """The protected pages, readable by nginx's unprivileged workers."""
    root = Path(tempfile.mkdtemp(prefix="vims-intranet-"))
    root.chmod(0o755)
    (root / "index.html").write_text("intranet: payroll\n")
    (root / "index.html").chmod(0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_gate_follows_the_verdict(rems: tuple[RemsService, str], tmp_path: Path,
                                  content: Path) -> None:
    service, rems_url = rems
    port, other = free_port(), free_port()
    gate = NginxGate(tmp_path / "gate")
    gate.configure([GateRoute("cvm1", f"127.0.0.1:{port}"),
                    GateRoute("cvm2", f"127.0.0.1:{other}")], rems_url, content)
    gate.start(wait_url=f"http://127.0.0.1:{port}/")
    try:
        url = f"http://127.0.0.1:{port}/"
        assert get(url)[0] == 403  # unknown C-VM: no verdict yet
        service.ingest_report("avm1", "cvm1", 1, GENESIS, report())
        assert get(url) == (200, "intranet: payroll\n")
        assert get(f"http://127.0.0.1:{other}/")[0] == 403  # another C-VM's verdict is its own
        service.ingest_report("avm1", "cvm1", 2, GENESIS, report(hooked=True))
        assert get(url)[0] == 403
        service.ingest_report("avm1", "cvm1", 3, GENESIS, report())
        assert get(url)[0] == 200
        time.sleep(1.7)  # 3 x 0.5 s without a report: the verdict lapses
        assert get(url)[0] == 403
    finally:
        gate.stop()


def test_gate_fails_closed_when_the_rems_is_down(tmp_path: Path, content: Path) -> None:
    port = free_port()
    gate = NginxGate(tmp_path / "gate")
    gate.configure([GateRoute("cvm1", f"127.0.0.1:{port}")], f"http://127.0.0.1:{free_port()}",
                   content)
    gate.start(wait_url=f"http://127.0.0.1:{port}/")
    try:
        status, body = get(f"http://127.0.0.1:{port}/")
        assert status >= 500
        assert "payroll" not in body
    finally:
        gate.stop()


@pytest.mark.parametrize(("routes", "url"), [
    ([], "http://127.0.0.1:1"),
    ([GateRoute("bad name;", "127.0.0.1:80")], "http://127.0.0.1:1"),
    ([GateRoute("cvm1", "127.0.0.1:80; include /etc/passwd")], "http://127.0.0.1:1"),
    ([GateRoute("cvm1", "127.0.0.1:80")], "http://x/y; evil"),
])
def test_bad_gate_input_is_refused(routes: list[GateRoute], url: str, tmp_path: Path) -> None:
    with pytest.raises(GateError):
        render(routes, url, tmp_path, tmp_path)
