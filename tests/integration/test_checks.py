"""Introspection checks against the real lab guest: clean passes, real attacks are found.

Attacks are done the way a rootkit leaves memory: from inside the guest where
possible, otherwise by writing the guest's RAM from the host while it is
paused (tests/attacks.py), undone afterwards so the session's guest stays clean.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.attacks import patched, unlinked
from tests.conftest import findings_of, guest_tool, push, sh, start_bg, vims
from vims.baseline import load as load_baseline
from vims.checks import DEFAULT_CHECKS
from vims.checks.runner import run_round
from vims.lab import Lab, LabManager, LabSpec
from vims.vmi.linux import Linux, Struct
from vims.vmi.memory import GuestMemory, MemoryReadError
from vims.vmi.profile import Profile

pytestmark = [pytest.mark.lab, pytest.mark.slow]
SCHEMA = json.loads((Path(__file__).parents[2] / "docs/report.schema.json").read_text())


@pytest.fixture(scope="module")
def profile(profile_path: Path) -> Profile:
    return Profile.load(profile_path)


@pytest.fixture(scope="module")
def baseline(baseline_path: Path) -> dict[str, Any]:
    return load_baseline(baseline_path)


def round_(mem: GuestMemory, baseline: dict[str, Any], policy: dict[str, Any],
           *ids: str, consistency: str = "auto") -> dict[str, Any]:
    report = run_round(mem, list(ids), baseline, policy, consistency, {"memory": "lab"})
    jsonschema.validate(report, SCHEMA)
    return report


def kill_tagged(mgr: LabManager, lab: Lab, comm: str, tag: str) -> None:
    """Kill the guest's ``comm`` processes whose command line holds ``tag``."""
    sh(mgr, lab, f"for p in $(pidof {comm}); do grep -q {tag} /proc/$p/cmdline && kill $p;"
       " done; true")


def settled_pids(text: str, me: int) -> set[int]:
    return {int(line.split()[0]) for line in text.splitlines()[1:]
            if line.split() and int(line.split()[0]) < me}


# ------------------------------------------------------------ semantic view
def test_process_list_equals_guest_ps(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                                      baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    start_bg(lab_manager, lab, "sleep 7777 >/dev/null 2>&1", "sleep", "7777")
    out = sh(lab_manager, lab, "echo $$; ps")
    me, ps_text = int(out.split("\n", 1)[0]), out.split("\n", 1)[1]
    report = round_(mem, baseline, policy, "process.hidden")
    seen = {p["pid"] for p in report["processes"]}
    guest = settled_pids(ps_text, me)
    assert guest <= seen | {0}
    assert {p for p in seen if p < me} == guest
    sleeper = [p for p in report["processes"] if p["comm"] == "sleep"]
    assert sleeper
    assert sleeper[0]["exe"] == "/bin/busybox"
    httpd = next(p for p in report["processes"] if p["comm"] == "httpd")
    assert (httpd["uid"], httpd["ppid"]) == (33, 1)
    kill_tagged(lab_manager, lab, "sleep", "7777")


def test_a_zombie_is_listed_as_exited_and_not_judged_as_a_kernel_thread(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
        policy: dict[str, Any]) -> None:
    # The background child exits; its parent has become `sleep` by exec and never reaps it.
    start_bg(lab_manager, lab, "sh -c 'true & exec sleep 7778' >/dev/null 2>&1", "sleep", "7778")
    try:
        zombies = sh(lab_manager, lab, "for s in /proc/[0-9]*/status; do p=$(awk '/^PPid/ "
                     "{print $2}' $s 2>/dev/null); grep -q '^State:.*Z' $s 2>/dev/null && "
                     "grep -q 7778 /proc/$p/cmdline && basename ${s%/status}; done; true")
        assert len(zombies.split()) == 1, zombies
        zombie = int(zombies)
        no_kthreads = {**policy, "processes": {**policy["processes"], "kernel_threads": False}}
        report = round_(mem, baseline, no_kthreads, "process.hidden", "process.allowlist")
        by_pid = {p["pid"]: p for p in report["processes"]}
        assert (by_pid[zombie]["exited"], by_pid[zombie]["kernel_thread"]) == (True, False)
        assert (by_pid[2]["exited"], by_pid[2]["kernel_thread"]) == (False, True)  # kthreadd
        sleeper = next(p for p in report["processes"] if p["comm"] == "sleep")
        assert (sleeper["exited"], sleeper["kernel_thread"]) == (False, False)
        flagged = {f["evidence"]["pid"] for f in report["findings"]
                   if f["check"] == "process.allowlist"}
        assert 2 in flagged  # kernel threads are judged under this policy
        assert zombie not in flagged  # an exited process is not one
    finally:
        kill_tagged(lab_manager, lab, "sleep", "7778")


def test_own_page_walk_agrees_with_libvmi(lab_manager: LabManager, lab: Lab,
                                          mem: GuestMemory) -> None:
    """process.code's page-table walker against LibVMI's translation, page by page,
    over every process's code, stack top and heap."""
    pages = 0
    with mem.paused():
        mem.flush()
        for t in Linux(mem).tasks():
            if not t.mm:  # kernel threads and exited processes
                continue
            mm = Struct(mem, "mm_struct", t.mm)
            for lo, hi in ((mm.ptr("start_code"), mm.ptr("end_code")),
                           (mm.ptr("start_stack") - (64 << 10), mm.ptr("start_stack")),
                           (mm.ptr("start_brk"), mm.ptr("brk"))):
                ref = {}
                for v in range(lo & ~4095, hi, 4096):
                    with contextlib.suppress(MemoryReadError):
                        ref[v] = mem.uv2p(v, t.pgd) & ~4095
                assert dict(mem.user_pages(t.pgd, lo, hi)) == ref, (t.pid, t.comm, hex(lo))
                pages += len(ref)
    assert pages > 500


def test_module_list_equals_proc_modules(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                                         baseline: dict[str, Any],
                                         policy: dict[str, Any]) -> None:
    def guest_modules() -> dict[str, int]:
        lines = sh(lab_manager, lab, "cat /proc/modules").splitlines()
        return {ln.split()[0]: int(ln.split()[1]) for ln in lines}

    def seen() -> dict[str, int]:
        report = round_(mem, baseline, policy, "kernel.modules")
        return {m["name"]: m["size"] for m in report["modules"]}

    assert seen() == guest_modules()
    assert set(seen()) == {"e1000", "qemu_fw_cfg"}
    sh(lab_manager, lab, "modprobe dummy")
    try:
        assert seen() == guest_modules()
        assert "dummy" in seen()
        report = round_(mem, baseline, policy, "kernel.modules")
        hits = findings_of(report, "kernel.modules")
        assert [f["evidence"]["module"] for f in hits] == ["dummy"]
    finally:
        sh(lab_manager, lab, "rmmod dummy")
    assert "dummy" not in seen()


# ----------------------------------------------------------------- clean
def test_clean_guest_passes_every_check(mem: GuestMemory, baseline: dict[str, Any],
                                        policy: dict[str, Any]) -> None:
    report = round_(mem, baseline, policy)
    failed = [(c["id"], c["error"]) for c in report["checks"] if c["status"] != "pass"]
    assert failed == [], report["findings"]
    assert report["result"] == "pass"
    assert [c["id"] for c in report["checks"]] == list(DEFAULT_CHECKS)


def test_clean_guest_under_churn_has_no_false_positives(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
        policy: dict[str, Any]) -> None:
    sh(lab_manager, lab, "touch /run/churn")
    try:
        for _ in range(5):
            report = round_(mem, baseline, policy)
            assert report["findings"] == []
            assert report["result"] == "pass", report["checks"]
    finally:
        sh(lab_manager, lab, "rm -f /run/churn")


def test_paused_rounds_under_web_load_see_no_hidden_task(
        lab: Lab, mem: GuestMemory, baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    """httpd's workers reap themselves (SIGCHLD ignored): each leaves the task list in
    exit_notify and runs on to its last schedule(). Hundreds of pauses under load land
    in that window several times (measured: 9 in 1,545); none may read as hidden."""
    load = subprocess.Popen(["httperf", "--hog", "--server", "127.0.0.1", "--port",
                             str(lab.http_port), "--num-conns", "100000", "--timeout", "5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, rounds = time.monotonic() + 30, 0
        while time.monotonic() < deadline:
            report = round_(mem, baseline, policy, "process.hidden", consistency="pause")
            assert report["findings"] == []
            rounds += 1
    finally:
        load.kill()
        load.wait()
    assert rounds > 100


def test_retry_consistency_under_churn_has_no_false_positives(
        lab_manager: LabManager, lab: Lab, profile: Profile, baseline: dict[str, Any],
        policy: dict[str, Any]) -> None:
    """Without pausing, torn reads of a churning task list must not become findings."""
    sh(lab_manager, lab, "touch /run/churn")
    try:
        with GuestMemory(profile, path=Path(lab.ram_path)) as unpaused:  # no pauser
            for _ in range(5):
                report = round_(unpaused, baseline, policy, "process.hidden", "process.creds",
                                "process.allowlist", "kernel.modules", consistency="auto")
                assert report["consistency"]["mode"] == "retry"
                assert report["findings"] == []
    finally:
        sh(lab_manager, lab, "rm -f /run/churn")


def test_baseline_holds_across_a_reboot_with_another_kaslr_slide(
        lab_manager: LabManager, lab: Lab, profile: Profile, baseline: dict[str, Any],
        policy: dict[str, Any], mem: GuestMemory) -> None:
    """The clean baseline of one boot is valid for the next: relocations are undone."""
    other = lab_manager.up(LabSpec(name=f"{lab.name}-reboot"))
    try:
        with GuestMemory(profile, path=Path(other.ram_path),
                         pauser=lambda: lab_manager.paused(other.name)) as m2:
            if m2.kaslr_offset == mem.kaslr_offset:  # about 1 boot in 500 repeats a slide
                pytest.skip("the reboot drew the same KASLR slide")
            report = round_(m2, baseline, policy)
        assert report["result"] == "pass", (report["findings"], report["checks"])
    finally:
        lab_manager.down(other.name)


def test_cr3_view_is_not_applicable_to_a_memory_file_and_refuses_a_bad_window(
        mem: GuestMemory) -> None:
    """process.address_spaces needs hypervisor events: a RAM file has none to give."""
    cid = "process.address_spaces"
    report = run_round(mem, [cid], None, None, "none", {"memory": "lab"})
    (result,) = report["checks"]
    assert result["status"] == "not_applicable"
    assert "live domain" in result["error"]
    for bad in (0, 61, "5", None, [5], True):
        report = run_round(mem, [cid], None, None, "none", {"memory": "lab"},
                           params={cid: {"window_s": bad}})
        (result,) = report["checks"]
        assert result["status"] == "error", bad
        assert "window_s must be" in result["error"]


def test_cli_check_clean_exit_0_and_table(lab: Lab, profile_path: Path, baseline_path: Path,
                                          lab_policy: Path) -> None:
    args = ["check", "--memory", lab.ram_path, "--profile", str(profile_path), "--baseline",
            str(baseline_path), "--policy", str(lab_policy)]
    proc = vims(*args, "--format", "json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    jsonschema.validate(json.loads(proc.stdout), SCHEMA)
    table = vims(*args, "--format", "table")
    assert table.returncode == 0
    assert "kernel.syscall_table" in table.stdout
    assert "PASS" in table.stdout


def test_no_policy_judges_no_workload_it_was_not_told_about(
        lab_manager: LabManager, lab: Lab, profile_path: Path, baseline_path: Path) -> None:
    # A workload the lab's policy does not describe (another web server port, a
    # listener, a daemon under another name): without a policy nothing may flag it.
    try:
        start_bg(lab_manager, lab, "httpd -p 8080 -h /www -f", "httpd", "8080")
        start_bg(lab_manager, lab, "nc -l -p 7777 >/dev/null 2>&1 </dev/null", "nc", "7777")
        start_bg(lab_manager, lab, "sleep 6061 </dev/null >/dev/null 2>&1", "sleep", "6061")
        proc = vims("check", "--memory", lab.ram_path, "--profile", str(profile_path),
                    "--baseline", str(baseline_path), "--format", "json")
    finally:
        kill_tagged(lab_manager, lab, "httpd", "8080")
        kill_tagged(lab_manager, lab, "nc", "7777")
        kill_tagged(lab_manager, lab, "sleep", "6061")
    report = json.loads(proc.stdout)
    assert report["findings"] == [], report["findings"]
    assert proc.returncode == 0, proc.stderr
    status = {c["id"]: (c["status"], c["error"]) for c in report["checks"]}
    for cid in ("behaviour.children", "behaviour.files", "behaviour.sockets",
                "behaviour.memory"):
        assert status[cid] == ("not_applicable", "no behaviour policy")
    assert status["process.allowlist"][0] == "not_applicable"
    assert status["kernel.text"] == ("pass", None)


# --------------------------------------------------------------- attacks
def test_syscall_hook_is_found(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                               baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    table = mem.sym("sys_call_table")
    evil = mem.u64(table)  # __x64_sys_read's address: a real handler, the wrong one
    with lab_manager.paused(lab.name), patched(mem, table + 39 * 8, struct.pack("<Q", evil)):
        report = round_(mem, baseline, policy, "kernel.syscall_table")
    hits = findings_of(report, "kernel.syscall_table")
    assert [f["evidence"]["nr"] for f in hits] == [39]
    assert "getpid" in hits[0]["evidence"]["expected_symbol"]
    assert "read" in hits[0]["evidence"]["found_symbol"]
    assert findings_of(round_(mem, baseline, policy, "kernel.syscall_table"),
                    "kernel.syscall_table") == []


def test_kernel_text_patch_is_found(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                                    baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    # Inside a handler the lab never calls, so the paused guest cannot run it.
    target = mem.sym("__x64_sys_kexec_load") + 0x10
    with lab_manager.paused(lab.name), patched(mem, target, b"\x90\x90\x90\x90"):
        report = round_(mem, baseline, policy, "kernel.text")
    hits = findings_of(report, "kernel.text")
    assert len(hits) == 1
    assert hits[0]["evidence"]["page"] == f"0x{target & ~0xFFF:x}"
    assert findings_of(round_(mem, baseline, policy, "kernel.text"), "kernel.text") == []


def test_dispatcher_patch_is_found(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                                   baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    # 6.1 dispatches through x64_sys_call(): hooking there bypasses the table.
    target = mem.sym("x64_sys_call") + 0x40
    with lab_manager.paused(lab.name), patched(mem, target, b"\xcc"):
        hits = findings_of(round_(mem, baseline, policy, "kernel.text"), "kernel.text")
    assert len(hits) == 1
    assert "x64_sys_call" in hits[0]["evidence"]["symbol"] or hits[0]["evidence"]["page"] == \
        f"0x{target & ~0xFFF:x}"


def test_idt_hook_is_found(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                           baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    gate = mem.sym("idt_table") + 3 * 16  # #BP
    low = mem.read(gate, 2)
    with lab_manager.paused(lab.name), patched(mem, gate, bytes([low[0] ^ 0x40, low[1]])):
        hits = findings_of(round_(mem, baseline, policy, "kernel.idt"), "kernel.idt")
    assert [f["evidence"]["vector"] for f in hits] == [3]


def test_hidden_process_is_found(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                                 baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    start_bg(lab_manager, lab, "sleep 8888 >/dev/null 2>&1", "sleep", "8888")
    try:
        with lab_manager.paused(lab.name):
            mem.flush()
            victim = next(t for t in Linux(mem).tasks() if t.comm == "sleep")
            entry = victim.address + mem.profile.offset("task_struct", "tasks")
            with unlinked(mem, entry):
                report = round_(mem, baseline, policy, "process.hidden")
                assert victim.pid not in {p["pid"] for p in report["processes"]}
            hits = findings_of(report, "process.hidden")
        assert [f["evidence"]["pid"] for f in hits] == [victim.pid]
        assert hits[0]["evidence"]["seen_in"] == "pid_idr"
    finally:
        kill_tagged(lab_manager, lab, "sleep", "8888")


def test_hidden_module_is_found(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                                baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    sh(lab_manager, lab, "modprobe dummy")
    try:
        with lab_manager.paused(lab.name):
            mem.flush()
            dummy = next(m for m in Linux(mem).modules() if m.name == "dummy")
            entry = dummy.address + mem.profile.offset("module", "list")
            with unlinked(mem, entry):
                report = round_(mem, baseline, policy, "kernel.hidden_modules", "kernel.modules")
        assert "dummy" not in {m["name"] for m in report["modules"]}
        hits = findings_of(report, "kernel.hidden_modules")
        assert [f["evidence"]["module"] for f in hits] == ["dummy"]
    finally:
        sh(lab_manager, lab, "rmmod dummy")


def test_module_hidden_from_list_and_sysfs_is_found_by_scan(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
        policy: dict[str, Any]) -> None:
    sh(lab_manager, lab, "modprobe dummy")
    try:
        p = mem.profile
        with lab_manager.paused(lab.name):
            mem.flush()
            dummy = next(m for m in Linux(mem).modules() if m.name == "dummy")
            kobj_entry = (dummy.address + p.offset("module", "mkobj")
                          + p.offset("module_kobject", "kobj") + p.offset("kobject", "entry"))
            with unlinked(mem, dummy.address + p.offset("module", "list")), \
                    unlinked(mem, kobj_entry):
                report = round_(mem, baseline, policy, "kernel.hidden_modules")
        hits = findings_of(report, "kernel.hidden_modules")
        assert [(f["evidence"]["module"], f["evidence"]["seen_in"]) for f in hits] == [
            ("dummy", "scan")]
    finally:
        sh(lab_manager, lab, "rmmod dummy")


def test_patched_process_code_is_found(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                                       baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    with lab_manager.paused(lab.name):
        mem.flush()
        httpd = next(t for t in Linux(mem).tasks() if t.comm == "httpd")
        start = mem.u64(httpd.mm + mem.profile.offset("mm_struct", "start_code"))
        end = mem.u64(httpd.mm + mem.profile.offset("mm_struct", "end_code"))
        page = paddr = 0
        for page in range((start & ~0xFFF) + 0x3000, end, 0x1000):  # a resident code page
            try:
                paddr = mem.uv2p(page + 0x123, httpd.pgd)
                break
            except MemoryReadError:
                continue
        assert paddr
        original = mem.read_pa(paddr, 2)
        mem.write_pa(paddr, b"\xeb\xfe")  # jmp $ : a code injection
        try:
            report = round_(mem, baseline, policy, "process.code")
        finally:
            mem.write_pa(paddr, original)
    hits = findings_of(report, "process.code")
    assert any(f["evidence"]["pid"] == httpd.pid and f["evidence"]["page"] == f"0x{page:x}"
               for f in hits)
    assert findings_of(round_(mem, baseline, policy, "process.code"), "process.code") == []


def test_a_code_page_the_baseline_lacks_is_a_finding(lab_manager: LabManager, lab: Lab,
                                                     mem: GuestMemory,
                                                     baseline: dict[str, Any],
                                                     policy: dict[str, Any]) -> None:
    # Resident text that no golden page vouches for (here: the baseline loses the page
    # of busybox's entry point, which every running process has resident) fails.
    import copy

    entry = baseline["executables"]["/bin/busybox"]
    with lab_manager.paused(lab.name):
        mem.flush()
        init = next(t for t in Linux(mem).tasks() if t.pid == 1)
        start = mem.u64(init.mm + mem.profile.offset("mm_struct", "start_code"))
    bias = start - entry["text_start"]
    resident = next(int(k) for k in sorted(entry["pages"], key=int)
                    if _resident(mem, init.pgd, int(k) + bias))
    thinner = copy.deepcopy(baseline)
    del thinner["executables"]["/bin/busybox"]["pages"][str(resident)]
    hits = findings_of(round_(mem, thinner, policy, "process.code"), "process.code")
    assert hits
    assert {f["evidence"]["page"] for f in hits} == {f"0x{resident + bias:x}"}
    assert all("has no page in /bin/busybox's baseline" in f["summary"] for f in hits)


def _resident(mem: GuestMemory, pgd: int, vaddr: int) -> bool:
    try:
        mem.uv2p(vaddr, pgd)
    except MemoryReadError:
        return False
    return True


def test_unknown_executable_is_found(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                                     baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    # Named after an applet: a busybox copy called anything else exits at once
    # ("applet not found"), and the check would have to catch it in that instant.
    sh(lab_manager, lab, "mkdir -p /tmp/evil && cp /bin/busybox /tmp/evil/sleep")
    start_bg(lab_manager, lab, "/tmp/evil/sleep 5555 >/dev/null 2>&1", "sleep", "5555")
    try:
        hits = findings_of(round_(mem, baseline, policy, "process.code"), "process.code")
        assert [f["evidence"]["exe"] for f in hits] == ["/tmp/evil/sleep"]
    finally:
        kill_tagged(lab_manager, lab, "sleep", "5555")
        sh(lab_manager, lab, "rm -rf /tmp/evil")


def test_unexpected_listener_is_found(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                                      baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    start_bg(lab_manager, lab, "nc -l -p 4444 >/dev/null 2>&1 </dev/null", "nc", "4444")
    try:
        hits = findings_of(round_(mem, baseline, policy, "process.allowlist"), "process.allowlist")
        assert [f["evidence"]["comm"] for f in hits] == ["nc"]
    finally:
        sh(lab_manager, lab, "kill $(pidof nc); true")


def test_a_program_running_from_a_deleted_file_is_found(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
        policy: dict[str, Any]) -> None:
    # A dropper's habit: start the payload, delete it, leave nothing on disk.
    try:
        sh(lab_manager, lab, "mkdir -p /tmp/vims-gone && cp /bin/busybox /tmp/vims-gone/sleep")
        start_bg(lab_manager, lab, "/tmp/vims-gone/sleep 6062 </dev/null >/dev/null 2>&1",
                 "sleep", "6062")
        sh(lab_manager, lab, "rm -rf /tmp/vims-gone")
        hits = findings_of(round_(mem, baseline, policy, "process.fileless"), "process.fileless")
        allowed = {**policy, "fileless": {"allow_deleted": ["sleep"]}}
        assert findings_of(round_(mem, baseline, allowed, "process.fileless"),
                           "process.fileless") == []
    finally:
        kill_tagged(lab_manager, lab, "sleep", "6062")
    assert [(h["evidence"]["comm"], h["evidence"]["exe"], h["evidence"]["memfd"])
            for h in hits] == [("sleep", "/tmp/vims-gone/sleep", False)]


def test_a_program_executed_from_memfd_is_found(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
        policy: dict[str, Any], tmp_path: Path) -> None:
    # A fileless loader (tests/guest/memfdexec.c): the payload's bytes go into an
    # anonymous memfd and run from there, never as a file on any file system.
    push(lab_manager, lab, guest_tool("memfdexec", tmp_path), "/tmp/memfdexec")
    # The kernel names such a process after the memfd's name: comm "memfd:payload".
    try:
        start_bg(lab_manager, lab, "/tmp/memfdexec /bin/busybox sleep 6063 </dev/null "
                 ">/dev/null 2>&1", "memfd:payload", "6063")
        hits = findings_of(round_(mem, baseline, policy, "process.fileless"), "process.fileless")
    finally:
        kill_tagged(lab_manager, lab, "memfd:payload", "6063")
    assert [(h["evidence"]["comm"], h["evidence"]["memfd"]) for h in hits] == [
        ("memfd:payload", True)]
    assert hits[0]["evidence"]["exe"].lstrip("/").startswith("memfd:payload")
    assert "memory-only code" in hits[0]["summary"]


def test_ld_preload_in_an_environment_and_ld_so_preload_are_found(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
        policy: dict[str, Any]) -> None:
    # Symbiote's way in: the loader maps the attacker's library into every program.
    try:
        start_bg(lab_manager, lab, "LD_PRELOAD=/tmp/vims-evil.so sleep 6063 </dev/null "
                 ">/dev/null 2>&1", "sleep", "6063")
        env_hits = findings_of(round_(mem, baseline, policy, "process.fileless"),
                               "process.fileless")
    finally:
        kill_tagged(lab_manager, lab, "sleep", "6063")
    assert [(h["evidence"]["comm"], h["evidence"]["ld_preload"]) for h in env_hits] == [
        ("sleep", "/tmp/vims-evil.so")]
    try:
        sh(lab_manager, lab, "echo /tmp/vims-evil.so > /etc/ld.so.preload")
        file_hits = findings_of(round_(mem, baseline, policy, "process.fileless"),
                                "process.fileless")
    finally:
        sh(lab_manager, lab, "rm -f /etc/ld.so.preload")
    assert [h["evidence"].get("path") for h in file_hits] == ["/etc/ld.so.preload"]
    assert findings_of(round_(mem, baseline, policy, "process.fileless"),
                       "process.fileless") == []


def test_root_credentials_written_in_place_are_found(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
        policy: dict[str, Any]) -> None:
    start_bg(lab_manager, lab, "su alice -c 'sleep 6666 >/dev/null 2>&1 &'", "sleep", "6666")
    try:
        assert findings_of(round_(mem, baseline, policy, "process.creds"), "process.creds") == []
        with lab_manager.paused(lab.name):
            mem.flush()
            victim = next(t for t in Linux(mem).tasks() if t.comm == "sleep" and t.uid == 1000)
            ids = victim.cred + mem.profile.offset("cred", "uid")
            with patched(mem, ids, bytes(32)):  # uid gid suid sgid euid egid fsuid fsgid = 0
                report = round_(mem, baseline, policy, "process.creds")
        hits = findings_of(report, "process.creds")
        assert [f["evidence"]["pid"] for f in hits] == [victim.pid]
    finally:
        kill_tagged(lab_manager, lab, "sleep", "6666")


def test_shared_init_cred_is_found(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                                   baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    with lab_manager.paused(lab.name):
        mem.flush()
        httpd = next(t for t in Linux(mem).tasks() if t.comm == "httpd")
        field = httpd.address + mem.profile.offset("task_struct", "cred")
        with patched(mem, field, struct.pack("<Q", mem.sym("init_cred"))):
            report = round_(mem, baseline, policy, "process.creds")
    hits = findings_of(report, "process.creds")
    assert any(httpd.pid in f["evidence"].get("tgids", []) for f in hits)


# ------------------------------------------------------------- bad input
def _one_line_error(proc: Any, needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("vims: error:")]
    assert len(errors) == 1, proc.stderr
    assert needle in errors[0], errors[0]


def test_missing_memory_file(profile_path: Path, tmp_path: Path) -> None:
    _one_line_error(vims("check", "--memory", str(tmp_path / "nope.raw"), "--profile",
                         str(profile_path)), "does not exist")


def test_wrong_kernel_for_profile(lab: Lab, profile_path: Path, tmp_path: Path) -> None:
    data = json.loads(profile_path.read_text())
    data["build_id"] = "00" * 20
    data["release"] = "5.10.0-99-amd64"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    _one_line_error(vims("check", "--memory", lab.ram_path, "--profile", str(other)),
                    "profile is for kernel")


def test_truncated_snapshot(lab: Lab, profile_path: Path, tmp_path: Path) -> None:
    snap = tmp_path / "snap.raw"
    assert vims("lab", "snapshot", lab.name, "--out", str(snap)).returncode == 0
    with snap.open("r+b") as f:
        f.truncate(100 << 20)
    proc = vims("check", "--memory", str(snap), "--profile", str(profile_path), "--format",
                "json", timeout=120)
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr


def test_fuzzed_structures_never_hang_or_crash(lab: Lab, profile: Profile, tmp_path: Path,
                                               baseline: dict[str, Any],
                                               policy: dict[str, Any]) -> None:
    """Random writes into the walked structures of a snapshot: every round ends with a report."""
    import random

    snap = tmp_path / "fuzz.raw"
    assert vims("lab", "snapshot", lab.name, "--out", str(snap)).returncode == 0
    rng = random.Random(1234)
    with GuestMemory(profile, path=snap) as m:
        linux = Linux(m)
        targets = [t.address for t in linux.tasks()] + [x.address for x in linux.modules()]
        off_tasks = profile.offset("task_struct", "tasks")
        results = set()
        for _ in range(40):
            base = rng.choice(targets)
            spot = base + rng.choice([off_tasks, off_tasks + 8, rng.randrange(0, 2048) & ~7])
            old = m.read(spot, 8)
            m.write(spot, rng.randbytes(8) if rng.random() < 0.7 else struct.pack("<Q", spot))
            m.flush()
            try:
                report = run_round(m, [], baseline, policy, "none", {"memory": str(snap)})
                jsonschema.validate(report, SCHEMA)
                results.add(report["result"])
            finally:
                m.write(spot, old)
    assert results <= {"pass", "fail", "error"}
    assert "error" in results or "fail" in results  # the corruption was noticed at least once
    shutil.rmtree(tmp_path, ignore_errors=True)
