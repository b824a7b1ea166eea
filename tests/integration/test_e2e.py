"""End to end on one machine: REM-S + A-VM (own swtpm) + lab C-VM + nginx gate.

The C-VM itself fetches the intranet page through the gate (busybox wget to the
host via QEMU's user network). It gets through while clean; a kernel rootkit
hook makes the gate refuse it within the check interval + 1 s; a dead A-VM
makes it refuse after the staleness limit; a restarted A-VM brings it back.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest

from tests.conftest import lab_deployment, wait_for
from tests.pg import private_postgres
from vims.checks import DEFAULT_CHECKS
from vims.gate.nginx import GateRoute, NginxGate
from vims.lab import Lab, LabManager
from vims.lab.deploy import LAUNCH_DATA, LabDeployment
from vims.net import free_port
from vims.rems.webhooks import ReplayCache, verify_webhook
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

pytestmark = [pytest.mark.lab, pytest.mark.slow]
INTERVAL = 2.0
STALE_AFTER = 3  # intervals
KEXEC_LOAD = 246  # a system call the lab never makes: safe to hook while it runs


@contextmanager
def kexec_load_hooked(lab: Lab, lab_manager: LabManager, profile_path: Path) -> Iterator[None]:
    """A rootkit hooks a system call in the running C-VM (the guest runs meanwhile)."""
    with GuestMemory(Profile.load(profile_path), path=Path(lab.ram_path)) as mem:
        slot = mem.sym("sys_call_table") + KEXEC_LOAD * 8
        original = mem.read(slot, 8)
        with lab_manager.paused(lab.name):
            mem.write(slot, mem.read(mem.sym("sys_call_table") + 39 * 8, 8))
        try:
            yield
        finally:
            with lab_manager.paused(lab.name):
                mem.write(slot, original)


@pytest.fixture
def deployment(lab: Lab, profile_path: Path, baseline_path: Path,
               lab_policy: Path) -> Iterator[LabDeployment]:
    with lab_deployment("vims-e2e-", ram=Path(lab.ram_path), profile=profile_path,
                        baseline=baseline_path, local_policy=lab_policy) as dep:
        yield dep


@pytest.fixture
def gate(deployment: LabDeployment) -> Iterator[int]:
    content = Path(tempfile.mkdtemp(prefix="vims-intranet-"))
    content.chmod(0o755)
    (content / "index.html").write_text("intranet: payroll\n")
    (content / "index.html").chmod(0o644)
    port = free_port()
    nginx = NginxGate(deployment.root / "gate")
    nginx.configure([GateRoute(deployment.cvm, f"127.0.0.1:{port}")], deployment.gate_url,
                    content)
    nginx.start(wait_url=f"http://127.0.0.1:{port}/")
    yield port
    nginx.stop()
    shutil.rmtree(content, ignore_errors=True)


@pytest.fixture
def webhook(deployment: LabDeployment) -> Iterator[list[dict[str, object]]]:
    """A revocation receiver the REM-S is configured to notify; it keeps only what it
    could verify (the REM-S's signature from its JWK set, issuer, age, no replay)."""
    received: list[dict[str, object]] = []
    refused: list[str] = []
    seen = ReplayCache()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            token = self.rfile.read(int(self.headers["Content-Length"])).decode()
            _, jwks = deployment.call("GET", "/.well-known/jwks.json", b"")
            try:
                received.append(verify_webhook(token, json.loads(jwks), issuer=deployment.http_url,
                                               seen=seen, max_age_s=60))
                self.send_response(204)
            except jwt.InvalidTokenError as exc:
                refused.append(str(exc))
                self.send_response(401)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = deployment.rems_config.read_text().replace("[rems.tls]", (
        f'[[rems.webhooks]]\nurl = "http://127.0.0.1:{server.server_port}/revoked"\n\n'
        "[rems.tls]"))
    deployment.rems_config.write_text(config)
    yield received
    server.shutdown()
    assert refused == []


def test_gate_follows_the_c_vm_integrity(lab: Lab, lab_manager: LabManager, profile_path: Path,
                                         deployment: LabDeployment, gate: int,
                                         webhook: list[dict[str, object]]) -> None:
    dep = deployment
    dep.start_rems()
    policy = {"checks": [{"id": c, "interval_s": INTERVAL} for c in DEFAULT_CHECKS],
              "stale_after_intervals": STALE_AFTER, "quote_every": 3, "heartbeat_s": 2}
    assert dep.put("/v1/policies/lab", json.dumps(policy).encode()) == 200
    assert dep.put(f"/v1/cvms/{dep.cvm}/policy", b'{"policy": "lab"}') == 200
    dep.start_avm()

    def through_gate() -> bool:
        """The C-VM's own request to the protected page."""
        r = lab_manager.exec(lab.name, f"vims-fetch 10.0.2.2 {gate} /",
                             timeout=15)
        return r.exit_code == 0 and "payroll" in r.stdout

    wait_for(through_gate, 60, step=0.5)  # attested, clean: allowed

    with kexec_load_hooked(lab, lab_manager, profile_path):
        denied_after = wait_for(lambda: not through_gate(), INTERVAL + 1 + 3, step=0.2)
        assert denied_after <= INTERVAL + 1 + 1.5  # + the wget round trip itself
        assert dep.decision() == 403
        wait_for(lambda: len(webhook) == 1, 5)
        assert (webhook[0]["event"], webhook[0]["cvm"], webhook[0]["status"]) == (
            "revoked", dep.cvm, "contraindicated")
    assert wait_for(through_gate, 15, step=0.3) <= INTERVAL + 8  # clean again: allowed again

    # The A-VM dies: no fresh reports, the verdict lapses, the gate fails closed.
    dep.stop("avm", signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: dep.decision() == 403, INTERVAL * STALE_AFTER + 3, step=0.2)
    assert time.monotonic() - killed >= INTERVAL  # not before the staleness limit runs out
    assert not through_gate()
    wait_for(lambda: len(webhook) == 2, 5)  # a lapsed verdict revokes like a failing one
    assert (webhook[1]["cvm"], webhook[1]["status"]) == (dep.cvm, "stale")

    dep.start_avm()  # restart: re-attests, resumes the report chain
    wait_for(through_gate, 60, step=0.5)

    status, raw = dep.call("GET", f"/v1/cvms/{dep.cvm}/reports?limit=500", b"")
    assert status == 200, raw
    reports = json.loads(raw)
    seqs = sorted(r["seq"] for r in reports)
    assert seqs == list(range(1, len(seqs) + 1))  # nothing lost, duplicated or reordered
    by_seq = {r["seq"]: r for r in reports}
    for seq in seqs[1:]:  # the stored chain links up, across the A-VM's restart too
        assert by_seq[seq]["prev_hash"] == by_seq[seq - 1]["digest"], seq
    assert any(r["result"] == "fail" for r in reports)
    # The only findings of the whole run are the injected hook: no false positives from
    # the workload, the gate's fetches or the A-VM's own pauses.
    findings = [f for r in reports for f in r["report"].get("findings", [])]
    found = {(f["check"], f["evidence"].get("nr")) for f in findings}
    assert found == {("kernel.syscall_table", KEXEC_LOAD)}, [
        f for f in findings if f["check"] != "kernel.syscall_table"]
    audit = subprocess.run([sys.executable, "-m", "vims.cli", "rems", "audit", "verify",
                            "--config", str(dep.rems_config)], capture_output=True, text=True,
                           check=False)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_attest_on_demand_sees_an_attack_before_the_next_scheduled_round(
        lab: Lab, lab_manager: LabManager, profile_path: Path,
        deployment: LabDeployment) -> None:
    """POST /v1/attest: a fresh, quoted round now, whatever the policy's intervals."""
    dep = deployment
    dep.start_rems()
    slow = {"checks": [{"id": c, "interval_s": 600} for c in DEFAULT_CHECKS], "quote_every": 50}
    assert dep.put("/v1/policies/slow", json.dumps(slow).encode()) == 200
    assert dep.put(f"/v1/cvms/{dep.cvm}/policy", b'{"policy": "slow"}') == 200
    assert dep.call("POST", "/v1/attest/nosuchcvm")[0] == 404
    assert dep.call("POST", f"/v1/attest/{dep.cvm}")[0] == 503  # no A-VM yet
    dep.start_avm()
    wait_for(lambda: dep.decision() == 200, 60, step=0.3)  # the first scheduled round

    status, body = dep.call("POST", f"/v1/attest/{dep.cvm}", b'{"timeout_s": 30}', timeout=40)
    assert status == 200, body
    clean = json.loads(body)
    assert clean["trusted"] is True
    assert clean["status"] == "affirming"
    assert clean["report"]["seq"] == 2  # answered by a new report, not the last stored one
    assert clean["report"]["result"] == "pass"
    assert clean["claims"]["submods"][dep.cvm]["ear_status"] == "affirming"
    assert clean["claims"]["iss"] == dep.http_url
    assert dep.call("POST", f"/v1/attest/{dep.cvm}", token="x" * 20)[0] == 401

    with kexec_load_hooked(lab, lab_manager, profile_path):
        assert dep.decision() == 200  # the scheduled verdict still stands (600 s rounds)
        status, body = dep.call("POST", f"/v1/attest/{dep.cvm}", timeout=40)
        attacked = json.loads(body)
        assert status == 200, body
        assert attacked["trusted"] is False
        assert attacked["report"]["seq"] == 3
        assert {f["check"] for f in attacked["report"]["findings"]} == {"kernel.syscall_table"}
        assert dep.decision() == 403  # the gate follows the fresh verdict at once

    # The operator changes the policy: the REM-S pushes it to the connected A-VM, which
    # reschedules at once (no reconnect): 600 s rounds become 1 s rounds.
    def stored() -> int:
        status, body = dep.call("GET", f"/v1/cvms/{dep.cvm}/reports?limit=500", b"")
        return len(json.loads(body)) if status == 200 else -1

    before = stored()
    fast = {**slow, "checks": [{"id": "kernel.syscall_table", "interval_s": 1}]}
    assert dep.put("/v1/policies/slow", json.dumps(fast).encode()) == 200
    wait_for(lambda: stored() >= before + 3, 20, step=0.3)
    assert "policy slow v2 received" in (dep.root / "avm.log").read_text()


def test_an_a_vm_launched_otherwise_is_not_believed(deployment: LabDeployment) -> None:
    """A different measured launch (PCR 17 not golden): the handshake is refused and
    none of its reports is stored; the golden launch back, the same A-VM is accepted."""
    dep = deployment
    dep.start_rems()
    assert dep.put("/v1/policies/lab", json.dumps(
        {"checks": [{"id": "kernel.syscall_table", "interval_s": 1}]}).encode()) == 200
    assert dep.put(f"/v1/cvms/{dep.cvm}/policy", b'{"policy": "lab"}') == 200
    dep.enroll()
    dep.swtpm.drtm_measure(b"an unmeasured hypervisor")  # what a tampered launch looks like
    dep.start_avm()
    rems_log = dep.root / "rems.log"
    wait_for(lambda: "launch PCR 17 is not the golden value" in rems_log.read_text(), 30)
    time.sleep(4)
    refusals = rems_log.read_text().count("attestation_failed")
    assert 1 <= refusals <= 8  # the refused agent backs off (0.2 s, doubling, up to 5 s)
    status, body = dep.call("GET", f"/v1/cvms/{dep.cvm}/reports", b"")
    assert (status, json.loads(body)) == (200, [])
    assert dep.decision() == 403

    dep.swtpm.drtm_measure(LAUNCH_DATA)  # the golden launch: the agent's next try passes
    wait_for(lambda: dep.decision() == 200, 30, step=0.3)


def with_keys(toml: str, **values: str) -> str:
    """*toml* with the given top-level string keys set (lines ``key = "..."``)."""
    for key, value in values.items():
        toml = re.sub(rf'(?m)^{key} = ".*"$', f'{key} = "{value}"', toml, count=1)
    return toml


def test_two_rems_instances_share_one_postgresql(deployment: LabDeployment) -> None:
    """Several REM-S processes on one PostgreSQL database: the A-VM reports to one, the
    gate may ask the other, and the audit chain written by both stays one chain."""
    dep = deployment
    with private_postgres() as pg:
        url = pg.new_database()
        dep.rems_config.write_text(with_keys(dep.rems_config.read_text(), database=url))
        dep.start_rems()
        # A second instance: same database, keys and CA; its own ports.
        second = dep.root / "rems-b.toml"
        gate_b = free_port()
        second.write_text(with_keys(dep.rems_config.read_text(),
                                    http_listen=f"127.0.0.1:{free_port()}",
                                    gate_listen=f"127.0.0.1:{gate_b}",
                                    channel_listen=f"127.0.0.1:{free_port()}",
                                    audit_checkpoint_file=str(dep.root / "b-checkpoints")))
        dep._spawn("rems-b", ["rems", "serve", "--config", str(second)])
        b_url = f"http://127.0.0.1:{gate_b}"

        def decision_b() -> int:
            try:
                with urllib.request.urlopen(f"{b_url}/v1/decision/{dep.cvm}", timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return e.code
            except OSError:
                return -1

        wait_for(lambda: decision_b() in (200, 403), 30)
        assert decision_b() == 403  # nothing known yet, on either instance
        policy = {"checks": [{"id": c, "interval_s": 1} for c in DEFAULT_CHECKS]}
        assert dep.put("/v1/policies/lab", json.dumps(policy).encode()) == 200
        assert dep.put(f"/v1/cvms/{dep.cvm}/policy", b'{"policy": "lab"}') == 200
        dep.start_avm()
        wait_for(lambda: decision_b() == 200, 60, step=0.3)  # B sees what A stored
        dep.stop("avm")
        dep.stop("rems-b")
        audit = subprocess.run([sys.executable, "-m", "vims.cli", "rems", "audit", "verify",
                                "--database", url, "--format", "json"],
                               capture_output=True, text=True, check=False)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert json.loads(audit.stdout)["entries"] > 3
