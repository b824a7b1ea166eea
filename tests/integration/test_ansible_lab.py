"""The collection end to end on the one-machine lab: playbooks/site.yml converges
(REM-S, gate, A-VM with swtpm, lab C-VM), a second run changes nothing,
``--check`` attests for real and changes nothing, a host-side syscall hook makes
attest.yml fail the C-VM (403 at the gate), a re-run of site.yml on the hooked
C-VM neither trusts it nor takes the rootkit into a new baseline, and undoing
the hook makes it pass again.

Runs the controller venv's ansible-playbook as a user would, with its own lab
root, run directory and ports (extra vars), so it never touches a running demo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vims.net import free_port

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / ".venv-ctl" / "bin" / "ansible-playbook"
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


class Lab:
    def __init__(self, root: Path, extra: dict[str, object]) -> None:
        self.root = root
        self.extra = extra

    def play(self, playbook: str, *args: str, timeout: float = 900,
             ) -> tuple[int, str, dict[str, tuple[int, int]]]:
        """(exit status, output, {host: (changed, failed)})."""
        proc = subprocess.run(
            [str(PLAYBOOK), "-i", str(ROOT / "inventories/lab/hosts.yml"),
             "-e", json.dumps(self.extra), str(ROOT / "playbooks" / playbook), *args],
            capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT,
            env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
                 "ANSIBLE_NOCOLOR": "1"})
        out = proc.stdout + proc.stderr
        recap = {m[1]: (int(m[3]), int(m[5])) for m in RECAP.finditer(out)}
        return proc.returncode, out, recap

    def state_files(self) -> dict[str, float]:
        """Everything the roles wrote, with mtimes (the database, logs and the audit
        checkpoints excepted: an attestation round appends a report, the gate logs a
        request, the running REM-S appends a signed checkpoint every minute)."""
        return {str(p): p.stat().st_mtime for p in self.root.rglob("*")
                if p.is_file() and not re.search(r"\.(db|db-wal|db-shm|log)$", p.name)
                and p.name != "audit-checkpoints.jsonl"}


@pytest.fixture(scope="module")
def ansible_lab() -> Iterator[Lab]:
    if not PLAYBOOK.exists():
        pytest.fail("controller venv missing: run scripts/setup.sh")
    root = Path(tempfile.mkdtemp(prefix="vims-ansible-lab-"))
    root.chmod(0o755)  # nginx's workers (nobody) read the gate's page below it
    gate = free_port()
    lab = Lab(root, {
        "vims_lab_root": str(root / "state"), "vims_lab_run_dir": str(root / "run"),
        "vims_lab_log_dir": str(root / "log"),
        "vims_lab_rems_http_port": free_port(), "vims_lab_rems_channel_port": free_port(),
        "vims_lab_rems_gate_port": free_port(),
        "lab_cvm_name": "ansiblecvm1",
        "cvm_gate_route": {"cvm": "cvm1", "listen": f"127.0.0.1:{gate}"},
    })
    try:
        yield lab
    finally:
        lab.play("lab-down.yml", "-e", "lab_down_purge=true", timeout=300)
        shutil.rmtree(root, ignore_errors=True)


def test_site_converges_is_idempotent_and_check_mode_attests(ansible_lab: Lab) -> None:
    rc, out, recap = ansible_lab.play("site.yml")
    assert rc == 0, out[-3000:]
    assert re.search(r"cvm1\s+TRUSTED \(affirming\)\s+affirming\s+200", out), out[-2000:]
    assert recap["lab-avm"][0] > 0

    rc, out, recap = ansible_lab.play("site.yml")
    assert rc == 0, out[-3000:]
    assert {host: changed for host, (changed, _) in recap.items()} == {
        "lab-rems": 0, "lab-avm": 0, "cvm1": 0}, out[-3000:]

    before = ansible_lab.state_files()
    rc, out, recap = ansible_lab.play("site.yml", "--check")
    assert rc == 0, out[-3000:]
    assert all(changed == 0 for changed, _ in recap.values()), out[-3000:]
    # A real attestation ran (a fresh round, through the REM-S) ...
    assert re.search(r"cvm1\s+TRUSTED \(affirming\)", out)
    # ... and nothing else on the host changed.
    assert ansible_lab.state_files() == before


def test_attack_is_denied_and_undo_allowed(ansible_lab: Lab) -> None:
    rc, out, _ = ansible_lab.play("lab-attack.yml", "-e", "lab_attack=hook")
    assert rc == 0, out[-2000:]
    rc, out, recap = ansible_lab.play("attest.yml")
    assert rc == 2, out[-3000:]
    assert recap["cvm1"][1] == 1  # the untrusted C-VM is a failed host
    assert re.search(r"cvm1\s+UNTRUSTED \(contraindicated\)\s+contraindicated\s+403\s+"
                     r"kernel\.syscall_table", out), out[-2000:]
    assert "syscall 246 hooked" in out

    # site.yml again on the hooked C-VM: the baseline is not rebuilt from its memory, the
    # C-VM stays untrusted; asking for a new baseline is refused while it fails its own.
    baseline = ansible_lab.root / "state" / "avm" / "cvms" / "cvm1" / "baseline.json"
    pinned = baseline.read_bytes()
    rc, out, recap = ansible_lab.play("site.yml")
    assert rc == 2, out[-3000:]
    assert recap["cvm1"][1] == 1
    assert re.search(r"cvm1\s+UNTRUSTED", out), out[-2000:]
    assert baseline.read_bytes() == pinned
    rc, out, recap = ansible_lab.play("site.yml", "-e", "avm_baseline_update=true")
    assert rc == 2, out[-3000:]
    assert recap["lab-avm"][1] == 1, out[-3000:]
    assert "pass its current baseline" in out
    assert baseline.read_bytes() == pinned

    rc, out, _ = ansible_lab.play("lab-attack.yml", "-e", "lab_attack=undo")
    assert rc == 0, out[-2000:]
    rc, out, _ = ansible_lab.play("attest.yml")
    assert rc == 0, out[-3000:]
    assert re.search(r"cvm1\s+TRUSTED \(affirming\)\s+affirming\s+200", out)
