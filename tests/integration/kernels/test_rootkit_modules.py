"""A real rootkit module in the lab guest: built on the host against Debian's own
headers for the lab kernel (``linux-headers-<release>``, like the kernel image, from
the Debian archive), loaded with insmod, hooking the way KoviD, Singularity,
Reptile and Caraxes do (tests/guest/rootkit/vims_rk.c).

The orphan variants copy their handler into executable module-area memory and
fail their own load: the kernel frees the module, so no module list, kset or
module-memory scan shows anything, and only the hook betrays it, pointing into
memory no module owns.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import findings_of, guest_tool, push, start_bg, vims, vol_rows, wait_for

from vims.baseline import load as load_baseline
from vims.checks.runner import run_round
from vims.lab import Lab, LabManager
from vims.vmi.memory import GuestMemory

pytestmark = [pytest.mark.lab, pytest.mark.slow]
SOURCE = Path(__file__).parents[2] / "guest" / "rootkit"
KO = "/tmp/vims_rk.ko"
MODLOAD = "/tmp/modload"
EAGAIN = 11
UNOWNED = "module area memory that no loaded module owns"
HOOK_CHECKS = ("kernel.text", "kernel.ftrace", "kernel.kprobes", "kernel.netfilter",
               "kernel.modules", "kernel.hidden_modules")


def build_module(release: str, out: Path) -> Path:
    """vims_rk.ko for ``release``, built with kbuild from Debian's headers package
    (installed from the archive when missing)."""
    headers = Path(f"/usr/src/linux-headers-{release}")
    if not headers.is_dir():
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        f"linux-headers-{release}"], check=True, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=900)
    work = out / "rootkit"
    shutil.copytree(SOURCE, work)
    subprocess.run(["make", "-s", "-C", str(headers), f"M={work}", "modules"], check=True,
                   capture_output=True, timeout=600)
    ko = out / "vims_rk.ko"
    subprocess.run(["strip", "--strip-debug", "-o", str(ko), str(work / "vims_rk.ko")],
                   check=True)
    return ko


@pytest.fixture(scope="module")
def baseline(baseline_path: Path) -> dict[str, Any]:
    return load_baseline(baseline_path)


@pytest.fixture(scope="module")
def rootkit(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
            tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("rootkit")
    push(lab_manager, lab, build_module(mem.profile.release, out).read_bytes(), KO, "644")
    push(lab_manager, lab, guest_tool("modload", out), MODLOAD)
    return KO


@pytest.fixture(autouse=True)
def no_rootkit_left(lab_manager: LabManager, lab: Lab) -> Iterator[None]:
    yield
    lab_manager.exec(lab.name, "rmmod vims_rk 2>/dev/null")


def insmod(mgr: LabManager, lab: Lab, *params: str) -> None:
    r = mgr.exec(lab.name, f"insmod {KO} {' '.join(params)}")
    assert r.exit_code == 0, r.stderr


def orphan_load(mgr: LabManager, lab: Lab, *params: str) -> None:
    """A load whose init installs its hooks and then fails, so the kernel frees it."""
    assert mgr.exec(lab.name, f"{MODLOAD} {KO} '{' '.join(params)}'").exit_code == EAGAIN


def hook_round(mem: GuestMemory, baseline: dict[str, Any],
               policy: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    report = run_round(mem, list(HOOK_CHECKS), baseline, policy, "auto", {"memory": "lab"})
    failed = [(c["id"], c.get("error")) for c in report["checks"]
              if c["status"] not in ("pass", "fail")]
    assert failed == []
    return {c: findings_of(report, c) for c in HOOK_CHECKS}


def only(found: dict[str, list[dict[str, Any]]], check: str) -> dict[str, Any]:
    """The one finding of ``check``, every other hook check clean."""
    assert {c: len(f) for c, f in found.items() if f and c != check} == {}
    [hit] = found[check]
    return hit


def undo_orphan(mgr: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
                policy: dict[str, Any], handler: str) -> None:
    orphan_load(mgr, lab, f"undo={handler}")
    assert all(not f for f in hook_round(mem, baseline, policy).values())


def test_an_ftrace_hook_of_a_loaded_module_names_the_module(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, rootkit: str,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    insmod(lab_manager, lab, "mode=ftrace")
    found = hook_round(mem, baseline, policy)
    [ftrace] = found["kernel.ftrace"]
    assert ftrace["evidence"]["hooked"] == ["__x64_sys_getdents64"]
    assert ftrace["evidence"]["handler_owner"].startswith("text of module vims_rk+0x")
    assert [f["evidence"].get("module") for f in found["kernel.modules"]] == ["vims_rk"]
    assert found["kernel.text"] == []  # the patched fentry site is the ops' own call
    assert lab_manager.exec(lab.name, "rmmod vims_rk").exit_code == 0
    assert all(not f for f in hook_round(mem, baseline, policy).values())


def test_an_ftrace_hook_left_by_a_vanished_module(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, rootkit: str,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    orphan_load(lab_manager, lab, "mode=ftrace", "orphan=1")
    found = hook_round(mem, baseline, policy)
    assert [c for c, f in found.items() if f] == ["kernel.ftrace"]
    [handler] = [f for f in found["kernel.ftrace"] if "handler" in f["evidence"]]
    ev = handler["evidence"]
    assert handler["severity"] == "critical"
    assert (ev["hooked"], ev["handler_owner"]) == (["__x64_sys_getdents64"], UNOWNED)
    assert mem.read(int(ev["handler"], 16), 3) == bytes.fromhex("31c0c3")
    # Where the trampoline ftrace built for the ops calls the handler directly, that
    # call is the same finding seen from the trampoline.
    assert all(f["evidence"]["target"] == ev["handler"] for f in found["kernel.ftrace"]
               if f is not handler)
    undo_orphan(lab_manager, lab, mem, baseline, policy, ev["handler"])


def test_a_kprobe_left_by_a_vanished_module(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, rootkit: str,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    orphan_load(lab_manager, lab, "mode=kprobe", "orphan=1")
    lab_manager.exec(lab.name, "kill -0 1")  # the probed system call still works
    hit = only(hook_round(mem, baseline, policy), "kernel.kprobes")
    ev = hit["evidence"]
    # (at +0x4 on IBT kernels such as 6.12: a probe on a symbol skips its ENDBR64)
    assert (ev["probed"].split("+")[0], ev["role"], ev["handler_owner"]) == (
        "__x64_sys_kill", "pre_handler", UNOWNED)
    undo_orphan(lab_manager, lab, mem, baseline, policy, ev["handler"])


def test_a_netfilter_hook_left_by_a_vanished_module(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, rootkit: str,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    orphan_load(lab_manager, lab, "mode=netfilter", "orphan=1")
    hit = only(hook_round(mem, baseline, policy), "kernel.netfilter")
    ev = hit["evidence"]
    assert (ev["family"], ev["hook"], ev["handler_owner"]) == ("ipv4", "pre_routing", UNOWNED)
    undo_orphan(lab_manager, lab, mem, baseline, policy, ev["handler"])


@pytest.mark.parametrize(("mode", "symbol"), [("inline", "__x64_sys_kexec_load"),
                                              ("syscall", "x64_sys_call")])
def test_kernel_text_patched_by_a_module(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, rootkit: str,
        baseline: dict[str, Any], policy: dict[str, Any], mode: str, symbol: str) -> None:
    if not mem.profile.has_symbol(symbol):
        pytest.skip(f"kernel {mem.profile.release} has no {symbol}")
    insmod(lab_manager, lab, f"mode={mode}")
    found = hook_round(mem, baseline, policy)
    hits = found["kernel.text"]
    assert [f["evidence"].get("module") for f in found["kernel.modules"]] == ["vims_rk"]
    assert len(hits) == 1, hits
    ev = hits[0]["evidence"]
    assert ev["symbol"].split("+")[0] == symbol
    assert ev["target_owner"] == UNOWNED
    assert lab_manager.exec(lab.name, "rmmod vims_rk").exit_code == 0
    assert hook_round(mem, baseline, policy)["kernel.text"] == []


# ------------------------------------------------------------- oracle: volatility3
def low48(address: str) -> int:
    """An address as volatility3's text renderer prints it."""
    return int(address, 16) & (1 << 48) - 1


def test_volatility_sees_the_hooks_vims_reports(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, rootkit: str,
        baseline: dict[str, Any], policy: dict[str, Any], vol_base: list[str],
        tmp_path: Path) -> None:
    # The orphans' ftrace and netfilter hooks and an eBPF program, read by VIMS from the
    # live guest and by volatility3's linux.tracing.ftrace, linux.malware.netfilter and
    # linux.ebpf from a snapshot of the same memory.
    push(lab_manager, lab, guest_tool("bpfload", tmp_path), "/tmp/bpfload")
    orphan_load(lab_manager, lab, "mode=ftrace", "orphan=1")
    orphan_load(lab_manager, lab, "mode=netfilter", "orphan=1")
    start_bg(lab_manager, lab, "/tmp/bpfload rawtp sys_enter vol_probe > /dev/null",
             "bpfload", "vol_probe")
    try:
        wait_for(lambda: bool(findings_of(run_round(mem, ["kernel.bpf"], baseline, policy,
                                                    "auto", {"memory": "lab"}),
                                          "kernel.bpf")), 10)
        snap = tmp_path / "snap.raw"
        assert vims("lab", "snapshot", lab.name, "--out", str(snap)).returncode == 0
        with GuestMemory(mem.profile, path=snap) as frozen:
            report = run_round(frozen, ["kernel.ftrace", "kernel.netfilter", "kernel.bpf"],
                               baseline, policy, "auto", {"memory": "snapshot"})
        volatility = [*vol_base, "-f", str(snap)]
        ftrace = {int(r[2], 16): r for r in vol_rows(volatility, "linux.tracing.ftrace")}
        netfilter = {int(r[4], 16): r for r in vol_rows(volatility, "linux.malware.netfilter")}
        assert ftrace  # (volatility prints addresses in their low 48 bits)
        ebpf = {r[1]: r for r in vol_rows(volatility, "linux.ebpf")}
    finally:
        lab_manager.exec(lab.name, "for p in $(grep -l vol_probe /proc/[0-9]*/cmdline); do "
                                   "p=${p#/proc/}; kill ${p%/cmdline}; done")
    [fhook] = [f["evidence"] for f in findings_of(report, "kernel.ftrace")
               if "handler" in f["evidence"]]
    row = ftrace[low48(fhook["handler"])]
    # volatility 2.28.2 names a hooked function only at its exact address: on IBT kernels
    # (6.12) the fentry site sits past ENDBR64 and it prints "-".
    assert "__x64_sys_getdents64" in row[3] or (row[3] == "-" and "6.12" in mem.profile.release)
    assert int(row[0], 16) == low48(fhook["ops"])
    [nhook] = [f["evidence"] for f in findings_of(report, "kernel.netfilter")]
    row = netfilter[low48(nhook["handler"])]
    assert (row[1], row[2]) == ("IPV4", "PRE_ROUTING")
    assert row[7] == "True"  # volatility, too, finds no module owning the handler
    [prog] = [f["evidence"] for f in findings_of(report, "kernel.bpf")]
    assert ebpf["vol_probe"][2] == prog["tag"]
    orphan_load(lab_manager, lab, f"undo={fhook['handler']}")
    wait_for(lambda: not findings_of(run_round(mem, ["kernel.bpf"], baseline, policy, "auto",
                                               {"memory": "lab"}), "kernel.bpf"), 20, 0.5)
    undo_orphan(lab_manager, lab, mem, baseline, policy, nhook["handler"])


# ---------------------------------------------------------------------------- IDT
def test_a_replaced_idt_is_judged_where_the_cpu_reads_it(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, rootkit: str,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    # The module copies the IDT, re-points vector 0xf1 and loads the copy with lidt:
    # idt_table itself stays clean, so reading only the symbol misses the hook.
    insmod(lab_manager, lab, "mode=idt")
    report = run_round(mem, ["kernel.idt", "cpu.state"], baseline, policy, "auto",
                       {"memory": "lab"})
    [idtr] = findings_of(report, "cpu.state")
    [gate] = findings_of(report, "kernel.idt")
    assert idtr["evidence"]["idtr"] == gate["evidence"]["table_address"]
    assert (gate["evidence"]["vector"], gate["evidence"]["table"]) == (0xF1, "IDTR of vCPU 0")
    assert int(gate["evidence"]["found"], 16) >= 0xFFFFFFFFA0000000  # module-area code
    assert lab_manager.exec(lab.name, "rmmod vims_rk").exit_code == 0
    report = run_round(mem, ["kernel.idt", "cpu.state"], baseline, policy, "auto",
                       {"memory": "lab"})
    assert report["findings"] == []


def test_an_idt_gate_opened_to_user_space_is_found(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    from tests.attacks import patched

    # DPL 3 on a kernel vector lets user space raise it with int 0xf1.
    gate = mem.sym("idt_table") + 0xF1 * 16
    bits = int.from_bytes(mem.read(gate + 4, 2), "little")
    with lab_manager.paused(lab.name), patched(mem, gate + 4,
                                               (bits | 3 << 13).to_bytes(2, "little")):
        report = run_round(mem, ["kernel.idt"], baseline, policy, "none", {"memory": "lab"})
    [hit] = findings_of(report, "kernel.idt")
    assert (hit["evidence"]["gate"]["dpl"], hit["evidence"]["expected_gate"]["dpl"]) == (3, 0)
    assert hit["evidence"]["table"] == "idt_table"


def test_a_read_only_table_made_writable_is_found(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, rootkit: str,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    # set_memory_rw's effect done by hand: RW set in the entry mapping sys_call_table.
    insmod(lab_manager, lab, "mode=rw")
    report = run_round(mem, ["kernel.data"], baseline, policy, "auto", {"memory": "lab"})
    [hit] = findings_of(report, "kernel.data")
    ev = hit["evidence"]
    assert ev["region"] == "read-only data"
    assert int(ev["start"], 16) <= mem.sym("sys_call_table") < int(ev["end"], 16)
    assert lab_manager.exec(lab.name, "rmmod vims_rk").exit_code == 0
    report = run_round(mem, ["kernel.data"], baseline, policy, "auto", {"memory": "lab"})
    assert report["findings"] == []
