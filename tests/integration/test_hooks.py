"""Today's hooking techniques on the real lab guest: patch sites and ftrace.

Legitimate tracing is done inside the guest the way an administrator does it
(tracefs: the function tracer, a kprobe event), so the kernel itself registers
ftrace ops, allocates their trampolines and patches every fentry site. Attacks
are written from the host while the guest is paused (tests/attacks.py), into
exactly the places rootkits write: an inline ``jmp`` over a function's fentry
NOP (KHOOK/Reptile), a retargeted jump label or static call trampoline, the
ftrace caller's call, an ftrace handler re-pointed at memory no module owns.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.attacks import patched
from tests.conftest import findings_of, sh
from vims.baseline import load as load_baseline
from vims.checks.hooks import MODULES_END, MODULES_VADDR
from vims.checks.runner import run_round
from vims.lab import Lab, LabManager
from vims.vmi.ftrace import registered_ops
from vims.vmi.ktext import Site
from vims.vmi.memory import GuestMemory

pytestmark = [pytest.mark.lab, pytest.mark.slow]
TRACING = "/sys/kernel/tracing"


@pytest.fixture(scope="module")
def baseline(baseline_path: Path) -> dict[str, Any]:
    return load_baseline(baseline_path)


def round_(mem: GuestMemory, baseline: dict[str, Any], policy: dict[str, Any],
           *ids: str) -> dict[str, Any]:
    return run_round(mem, list(ids), baseline, policy, "auto", {"memory": "lab"})


def unowned(mem: GuestMemory) -> int:
    """An address in the module area that no loaded module's text covers."""
    from vims.vmi.linux import Linux

    mods = sorted((m.base, m.base + m.size) for m in Linux(mem).modules())
    addr = MODULES_VADDR + 0x100000
    for start, end in mods:
        if start <= addr < end:
            addr = end + 0x1000
    assert MODULES_VADDR <= addr < MODULES_END
    return addr


def site_in(mem: GuestMemory, function: str, kind: Site, length: int = 5) -> int:
    """The runtime address of the first patch site of ``kind`` inside ``function``."""
    profile = mem.profile
    layout = profile.text_layout
    stext = profile.symbol("_stext")
    start = profile.symbol(function)
    for (off, n), k in zip(layout.masks, layout.kinds, strict=True):
        if k == kind and n == length and start <= stext + off < start + 0x400 and \
                profile.symbolize(stext + off).split("+")[0] == function:
            return mem.sym("_stext") + off
    raise AssertionError(f"no {kind.name} site in {function}")


def rel32(opcode: int, site: int, target: int) -> bytes:
    return bytes([opcode]) + struct.pack("<i", target - site - 5)


def text_findings(mem: GuestMemory, baseline: dict[str, Any],
                  policy: dict[str, Any]) -> list[dict[str, Any]]:
    return findings_of(round_(mem, baseline, policy, "kernel.text"), "kernel.text")


# --------------------------------------------------------------- patch sites
def test_inline_jmp_over_an_fentry_nop_is_found(lab_manager: LabManager, lab: Lab,
                                                mem: GuestMemory, baseline: dict[str, Any],
                                                policy: dict[str, Any]) -> None:
    # KHOOK/Reptile: a 5-byte jmp at the function's entry, where ftrace's NOP sits.
    site = site_in(mem, "__x64_sys_kexec_load", Site.FTRACE)
    hook = unowned(mem)
    with lab_manager.paused(lab.name), patched(mem, site, rel32(0xE9, site, hook)) as before:
        hits = text_findings(mem, baseline, policy)
    assert before == bytes.fromhex("0f1f440000")
    assert [h["evidence"]["site"] for h in hits] == ["ftrace"]
    ev = hits[0]["evidence"]
    assert ev["address"] == f"0x{site:x}"
    assert ev["symbol"].split("+")[0] == "__x64_sys_kexec_load"
    assert ev["target"] == f"0x{hook:x}"
    assert ev["target_owner"] == "module area memory that no loaded module owns"
    assert text_findings(mem, baseline, policy) == []


def test_a_jump_label_retargeted_is_found(lab_manager: LabManager, lab: Lab, mem: GuestMemory,
                                          baseline: dict[str, Any],
                                          policy: dict[str, Any]) -> None:
    layout, stext = mem.profile.text_layout, mem.sym("_stext")
    i = next(i for i, ((off, n), k) in enumerate(zip(layout.masks, layout.kinds, strict=True))
             if k == Site.JUMP_LABEL and n == 5 and "kexec" in mem.profile.symbolize(
                 mem.profile.symbol("_stext") + off))
    site, own = stext + layout.masks[i][0], stext + layout.targets[i]
    with lab_manager.paused(lab.name):
        # The kernel's own flip of the key (a jump to the entry's target) is legitimate...
        with patched(mem, site, rel32(0xE9, site, own)):
            assert text_findings(mem, baseline, policy) == []
        # ...a jump anywhere else is not.
        with patched(mem, site, rel32(0xE9, site, own + 0x20)):
            hits = text_findings(mem, baseline, policy)
    assert [(h["evidence"]["site"], h["evidence"]["address"]) for h in hits] == [
        ("jump_label", f"0x{site:x}")]


def test_a_static_call_trampoline_hijacked_is_found(lab_manager: LabManager, lab: Lab,
                                                    mem: GuestMemory, baseline: dict[str, Any],
                                                    policy: dict[str, Any]) -> None:
    name = next(n for n in mem.profile.symbols if n.startswith("__SCT__") and "might_resched"
                not in n and "preempt" not in n and "cond_resched" not in n)
    site = mem.sym(name)
    hook = unowned(mem)
    with lab_manager.paused(lab.name), patched(mem, site, rel32(0xE9, site, hook)):
        hits = text_findings(mem, baseline, policy)
    assert [h["evidence"]["site"] for h in hits] == ["trampoline"]
    assert hits[0]["evidence"]["symbol"] == name
    assert hits[0]["evidence"]["target_owner"] == "module area memory that no loaded module owns"


def test_the_ftrace_callers_call_redirected_is_found(lab_manager: LabManager, lab: Lab,
                                                     mem: GuestMemory, baseline: dict[str, Any],
                                                     policy: dict[str, Any]) -> None:
    site = mem.sym("ftrace_regs_call")
    with lab_manager.paused(lab.name), patched(mem, site, rel32(0xE8, site, unowned(mem))):
        hits = text_findings(mem, baseline, policy)
    assert [h["evidence"]["site"] for h in hits] == ["ftrace_caller"]


# --------------------------------------------------------------- ftrace
@pytest.fixture(scope="module")
def tracing(lab_manager: LabManager, lab: Lab) -> Iterator[None]:
    """The function tracer on one function and a kprobe event on another, from tracefs."""
    sh(lab_manager, lab, f"[ -e {TRACING}/trace ] || mount -t tracefs nodev {TRACING}")
    sh(lab_manager, lab, f"echo __do_sys_getppid > {TRACING}/set_ftrace_filter && "
       f"echo function > {TRACING}/current_tracer && "
       f"echo 'p:vims_probe do_sys_openat2' > {TRACING}/kprobe_events && "
       f"echo 1 > {TRACING}/events/kprobes/vims_probe/enable")
    try:
        yield
    finally:
        sh(lab_manager, lab, f"echo 0 > {TRACING}/events/kprobes/vims_probe/enable; "
           f"echo > {TRACING}/kprobe_events; echo nop > {TRACING}/current_tracer; "
           f"echo > {TRACING}/set_ftrace_filter")


def test_legitimate_tracing_is_not_a_finding(tracing: None, mem: GuestMemory,
                                             baseline: dict[str, Any],
                                             policy: dict[str, Any]) -> None:
    with mem.paused():
        ops = registered_ops(mem)
    hooked = {mem.profile.symbolize(ip - mem.kaslr_offset).split("+")[0]
              for o in ops for ip in o.functions}
    # __do_sys_getppid is also __x64_sys_getppid: one function, two names.
    assert "do_sys_openat2" in hooked
    assert any(n.endswith("sys_getppid") for n in hooked)
    assert any(o.trampoline for o in ops)  # the kernel allocated a trampoline
    report = round_(mem, baseline, policy, "kernel.text", "kernel.ftrace", "kernel.kprobes")
    assert findings_of(report, "kernel.text") == []
    assert findings_of(report, "kernel.ftrace") == []
    assert findings_of(report, "kernel.kprobes") == []


def test_an_ftrace_handler_in_unowned_memory_is_found(lab_manager: LabManager, lab: Lab,
                                                      tracing: None, mem: GuestMemory,
                                                      baseline: dict[str, Any],
                                                      policy: dict[str, Any]) -> None:
    # KoviD/Caraxes: an ftrace_ops whose func is the rootkit's handler, left behind in
    # module memory after the module hid itself. Re-point the tracer's ops at such memory.
    hook = unowned(mem)
    with lab_manager.paused(lab.name):
        ops = next(o for o in registered_ops(mem) if any(
            "getppid" in mem.profile.symbolize(ip - mem.kaslr_offset) for ip in o.functions))
        func_at = ops.address + mem.profile.offset("ftrace_ops", "func")
        with patched(mem, func_at, struct.pack("<Q", hook)):
            hits = findings_of(round_(mem, baseline, policy, "kernel.ftrace"), "kernel.ftrace")
    assert len(hits) == 1
    assert hits[0]["severity"] == "critical"
    ev = hits[0]["evidence"]
    assert ev["handler"] == f"0x{hook:x}"
    assert ev["ops"] == f"0x{ops.address:x}"
    assert ev["handler_owner"] == "module area memory that no loaded module owns"
    assert len(ev["hooked"]) == 1
    assert ev["hooked"][0].endswith("sys_getppid")


def test_a_trampoline_call_redirected_is_found(lab_manager: LabManager, lab: Lab,
                                               tracing: None, mem: GuestMemory,
                                               baseline: dict[str, Any],
                                               policy: dict[str, Any]) -> None:
    from vims.checks.base import Context
    from vims.checks.hooks import trampoline_call

    hook = unowned(mem)
    with lab_manager.paused(lab.name):
        ctx = Context(mem, baseline, policy)
        ops = next(o for o in registered_ops(mem) if trampoline_call(ctx, o) is not None)
        site, code = trampoline_call(ctx, ops) or (0, b"")
        assert code[0] == 0xE8
        with patched(mem, site, rel32(0xE8, site, hook)):
            hits = findings_of(round_(mem, baseline, policy, "kernel.ftrace"), "kernel.ftrace")
    assert [h["evidence"]["target"] for h in hits] == [f"0x{hook:x}"]
    assert "trampoline" in hits[0]["summary"]


# --------------------------------------------------------------- kprobes
@pytest.fixture(scope="module")
def mid_probe(lab_manager: LabManager, lab: Lab, mem: GuestMemory) -> Iterator[int]:
    """A kprobe event on the instruction after do_sys_openat2's fentry site: a probe
    the kernel implements by patching text (int3, then an optimized jmp), not ftrace."""
    fentry = site_in(mem, "do_sys_openat2", Site.FTRACE)
    offset = fentry + 5 - mem.sym("do_sys_openat2")
    sh(lab_manager, lab, f"[ -e {TRACING}/trace ] || mount -t tracefs nodev {TRACING}")
    sh(lab_manager, lab, f"echo 'p:vims_mid do_sys_openat2+{offset}' >> {TRACING}/kprobe_events"
       f" && echo 1 > {TRACING}/events/kprobes/vims_mid/enable && cat /proc/self/status"
       " > /dev/null && sleep 1")
    try:
        yield fentry + 5
    finally:
        sh(lab_manager, lab, f"echo 0 > {TRACING}/events/kprobes/vims_mid/enable; "
           f"echo '-:vims_mid' >> {TRACING}/kprobe_events")


def test_a_kprobe_patching_text_is_accounted_for(mid_probe: int, mem: GuestMemory,
                                                 baseline: dict[str, Any],
                                                 policy: dict[str, Any]) -> None:
    from vims.vmi.kprobes import registered_kprobes

    with mem.paused():
        probes = [kp for kp in registered_kprobes(mem) if kp.addr == mid_probe]
        patched_byte = mem.read(mid_probe, 1)
    assert len(probes) == 1
    assert patched_byte in (b"\xcc", b"\xe9")
    report = round_(mem, baseline, policy, "kernel.text", "kernel.kprobes")
    assert findings_of(report, "kernel.text") == []
    assert findings_of(report, "kernel.kprobes") == []


def test_a_kprobe_handler_in_unowned_memory_is_found(lab_manager: LabManager, lab: Lab,
                                                     mid_probe: int, mem: GuestMemory,
                                                     baseline: dict[str, Any],
                                                     policy: dict[str, Any]) -> None:
    from vims.vmi.kprobes import registered_kprobes

    hook = unowned(mem)
    with lab_manager.paused(lab.name):
        (kp,) = [kp for kp in registered_kprobes(mem) if kp.addr == mid_probe]
        at = kp.address + mem.profile.offset("kprobe", "pre_handler")
        with patched(mem, at, struct.pack("<Q", hook)):
            hits = findings_of(round_(mem, baseline, policy, "kernel.kprobes"),
                               "kernel.kprobes")
            allowed = {**policy, "kprobes": {"allow": ["do_sys_openat2"]}}
            assert findings_of(round_(mem, baseline, allowed, "kernel.kprobes"),
                               "kernel.kprobes") == []
    assert [(h["evidence"]["role"], h["evidence"]["handler"]) for h in hits] == [
        ("pre_handler", f"0x{hook:x}")]
    assert hits[0]["evidence"]["probed"].startswith("do_sys_openat2+")
    assert hits[0]["evidence"]["handler_owner"] == "module area memory that no loaded module owns"


# --------------------------------------------------------------- netfilter
def test_a_netfilter_hook_in_unowned_memory_is_found(lab_manager: LabManager, lab: Lab,
                                                     mem: GuestMemory, baseline: dict[str, Any],
                                                     policy: dict[str, Any]) -> None:
    # KoviD/Reptile's magic-packet hook on IPv4 LOCAL_IN, its entries and handler in
    # memory no module owns. The entries go in a scratch page (empty_zero_page), the
    # guest paused throughout; both writes are undone before it runs again.
    from vims.vmi.netfilter import netfilter_hooks

    p = mem.profile
    slot = (mem.sym("init_net") + p.offset("net", "nf") + p.offset("netns_nf", "hooks_ipv4")
            + 8 * 1)  # NF_INET_LOCAL_IN
    scratch, hook = mem.sym("empty_zero_page"), unowned(mem)
    entries = struct.pack("<HxxxxxxQQ", 1, hook, 0)
    with lab_manager.paused(lab.name):
        assert [h for h in netfilter_hooks(mem) if h.family == "ipv4" and h.hooknum == 1] == []
        with patched(mem, scratch, entries), patched(mem, slot, struct.pack("<Q", scratch)):
            hits = findings_of(round_(mem, baseline, policy, "kernel.netfilter"),
                               "kernel.netfilter")
    assert [(h["evidence"]["family"], h["evidence"]["hook"], h["evidence"]["handler"])
            for h in hits] == [("ipv4", "local_in", f"0x{hook:x}")]
    assert hits[0]["evidence"]["handler_owner"] == "module area memory that no loaded module owns"
    assert findings_of(round_(mem, baseline, policy, "kernel.netfilter"),
                       "kernel.netfilter") == []


# --------------------------------------------------------------- kernel data
def data_findings(mem: GuestMemory, baseline: dict[str, Any],
                  policy: dict[str, Any]) -> list[dict[str, Any]]:
    return findings_of(round_(mem, baseline, policy, "kernel.data"), "kernel.data")


@pytest.mark.parametrize(("sysctl", "variable", "evil"), [
    ("kernel/modprobe", "modprobe_path", "/tmp/vims-evil"),
    ("kernel/core_pattern", "core_pattern", "|/tmp/vims-evil %p"),
])
def test_a_usermode_helper_path_rewritten_in_the_guest_is_found(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
        policy: dict[str, Any], sysctl: str, variable: str, evil: str) -> None:
    # What a rootkit does to get its program run as root by the kernel itself.
    clean = sh(lab_manager, lab, f"cat /proc/sys/{sysctl}").rstrip("\n")
    assert clean == baseline["kernel_data"]["strings"][variable]
    sh(lab_manager, lab, f"echo '{evil}' > /proc/sys/{sysctl}")
    try:
        hits = data_findings(mem, baseline, policy)
        allowed = {**policy, "kernel_data": {"allow": {variable: ["/tmp/vims-*", "|/tmp/*"]}}}
        assert data_findings(mem, baseline, allowed) == []
    finally:
        sh(lab_manager, lab, f"echo '{clean}' > /proc/sys/{sysctl}")
    assert [(h["evidence"]["variable"], h["evidence"]["found"]) for h in hits] == [
        (variable, evil)]
    assert data_findings(mem, baseline, policy) == []


def test_an_lsm_hook_re_pointed_at_unowned_memory_is_found(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
        policy: dict[str, Any]) -> None:
    from vims.vmi.kdata import lsm_hooks

    hook = unowned(mem)
    with lab_manager.paused(lab.name):
        hooks = lsm_hooks(mem)
        assert len(hooks) == baseline["kernel_data"]["lsm_hooks"] > 0
        victim = next(h for h in hooks if h.hook == "file_open") if any(
            h.hook == "file_open" for h in hooks) else hooks[0]
        at = victim.entry + mem.profile.offset("security_hook_list", "hook")
        with patched(mem, at, struct.pack("<Q", hook)):
            hits = data_findings(mem, baseline, policy)
    assert [(h["evidence"]["hook"], h["evidence"]["handler"]) for h in hits] == [
        (victim.hook, f"0x{hook:x}")]
    assert hits[0]["evidence"]["handler_owner"] == "module area memory that no loaded module owns"


def test_a_tracepoint_probe_in_unowned_memory_is_found(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
        policy: dict[str, Any]) -> None:
    from vims.vmi.kdata import tracepoint_probes

    event = f"{TRACING}/events/sched/sched_process_fork/enable"
    sh(lab_manager, lab, f"[ -e {TRACING}/trace ] || mount -t tracefs nodev {TRACING}")
    sh(lab_manager, lab, f"echo 1 > {event}")
    try:
        assert data_findings(mem, baseline, policy) == []  # the kernel's own probe
        hook = unowned(mem)
        with lab_manager.paused(lab.name):
            probe = next(p for p in tracepoint_probes(mem)
                         if p.tracepoint == "sched_process_fork")
            tp = mem.sym("__tracepoint_sched_process_fork")
            array = mem.u64(tp + mem.profile.offset("tracepoint", "funcs"))  # funcs[0].func
            with patched(mem, array, struct.pack("<Q", hook)):
                hits = data_findings(mem, baseline, policy)
        assert probe.func != hook
        assert [(h["evidence"]["tracepoint"], h["evidence"]["handler"]) for h in hits] == [
            ("sched_process_fork", f"0x{hook:x}")]
    finally:
        sh(lab_manager, lab, f"echo 0 > {event}")


# --------------------------------------------------------------- vCPU state
def test_cr0_wp_cleared_on_a_vcpu_is_found(lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
                                           policy: dict[str, Any]) -> None:
    # What a rootkit does before writing read-only kernel memory: clear CR0.WP. Done
    # through the lab's gdbstub (which stops the VM while attached), undone before detach.
    from vims.trace.gdbstub import Gdbstub

    assert baseline["cpu"]["cr4"]["smep"] in (True, False)  # recorded at the clean boot
    clean = run_round(mem, ["cpu.state"], baseline, policy, "none", {"memory": "lab"})
    assert findings_of(clean, "cpu.state") == []
    gdb = Gdbstub(Path(lab.gdb_socket))
    try:
        cr0 = gdb.read_registers()["cr0"]
        assert cr0 & (1 << 16)
        gdb.write_register("cr0", cr0 & ~(1 << 16))
        try:
            report = run_round(mem, ["cpu.state"], baseline, policy, "none", {"memory": "lab"})
        finally:
            gdb.write_register("cr0", cr0)
    finally:
        gdb.detach()
    hits = findings_of(report, "cpu.state")
    assert [h["evidence"]["cr0"] for h in hits] == [f"0x{cr0 & ~(1 << 16):x}"]
    assert "CR0.WP" in hits[0]["summary"]
