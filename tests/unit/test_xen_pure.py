"""The Xen lab's pure parts: domU configuration, types, the inittab overlay, the dom0 lock list."""

from __future__ import annotations

import contextlib
import gzip
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from vims.baseline import cpio_files
from vims.checks.base import Category, Check, Context, NotApplicable, Severity, Status
from vims.errors import LabError
from vims.lab.xen import (
    console_tail,
    crashed_domids,
    domu_config,
    domu_initrd,
    domu_types,
    xen_console_tail,
)
from vims.lab.xenimage import dom0_requirements
from vims.rems.verdict import TIERS, VerdictPolicy, appraise
from vims.vmi.events import Stop


def test_domu_types_accepts_lists_and_rejects_hvm() -> None:
    assert domu_types("pv") == ["pv"]
    assert domu_types("pv, pvh") == ["pv", "pvh"]
    for bad in ("hvm", "", "pv,,pvh"):
        with pytest.raises(LabError, match="bad domU type"):
            domu_types(bad)


def test_pvh_config_carries_the_tsc_settings_and_pv_does_not() -> None:
    pvh = domu_config("cvm2", "pvh", 256)
    assert 'type = "pvh"' in pvh
    assert 'tsc_mode = "native"' in pvh
    assert 'cpuid = "host,rdtscp=0"' in pvh
    pv = domu_config("cvm1", "pv", 256)
    assert "tsc_mode" not in pv
    assert "memory = 256" in pv
    assert 'extra = "console=hvc0' in pv


def test_domu_initrd_is_one_gzip_member_whose_later_inittab_wins(tmp_path: Path) -> None:
    from vims.lab.initramfs import find_static_busybox

    try:
        find_static_busybox()
    except LabError:
        pytest.skip("busybox-static not installed")

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/inittab").write_text("ttyS0::respawn:/sbin/x\n")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"\x7fELF-not-really")
    cpio = subprocess.run(["busybox", "cpio", "-o", "-H", "newc"], cwd=root,
                          input=b"etc\netc/inittab\nbin\nbin/tool\n", capture_output=True,
                          check=True).stdout
    src = tmp_path / "cvm.cpio.gz"
    src.write_bytes(gzip.compress(cpio))
    out = tmp_path / "domu.cpio.gz"
    domu_initrd(src, out)
    raw = out.read_bytes()
    # libxc inflates one member only: the file must be a single gzip stream.
    d = zlib.decompressobj(31)
    body = d.decompress(raw)
    assert d.unused_data == b""
    # The baseline reads the first archive (the original, byte for byte) ...
    assert dict(cpio_files(body))["/bin/tool"] == b"\x7fELF-not-really"
    # ... and the kernel unpacks the second after it, replacing the inittab.
    assert body.startswith(cpio)
    assert b"hvc0::respawn:/sbin/vims-console" in body[len(cpio):]


def test_dom0_requirements_carry_the_agent_not_the_test_stack() -> None:
    names = {r.split("==")[0] for r in dom0_requirements()}
    # The A-VM agent runs in dom0: introspection, the CLI, the vTPM's quotes, HTTP.
    assert {"libvmi", "click", "tpm2-pytss", "httpx"} <= names
    assert not names & {"pytest", "mypy", "ruff", "volatility3"}


class _PvOnly(Check):
    id = "kernel.test_na"
    description = "raises NotApplicable"
    severity = Severity.HIGH
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[object]:  # type: ignore[override]
        raise NotApplicable("Xen PV domain: not what the CPU uses")


def test_not_applicable_is_its_own_status_and_affirms_nothing() -> None:
    result = _PvOnly().execute(None)  # type: ignore[arg-type]
    assert result.status == Status.NOT_APPLICABLE
    assert result.error == "Xen PV domain: not what the CPU uses"
    report = {"checks": [{"id": "kernel.idt", "status": "not_applicable",
                          "category": "executables", "error": "PV"}], "findings": []}
    appraisal = appraise(report, VerdictPolicy(name="test"))
    assert appraisal.vector["executables"] == TIERS["none"]


def test_domains_are_kept_after_a_crash_or_a_triple_fault() -> None:
    # Xen turns an HVM/PVH triple fault into a reboot: "destroy" would leave nothing
    # to look at, and the tests would only see a domain missing.
    cfg = domu_config("cvm2", "pvh", 256)
    assert 'on_crash = "preserve"' in cfg
    assert 'on_reboot = "preserve"' in cfg


# As Xen 4.17 prints them (hvm_triple_fault(), __domain_crash()), between other lines.
XEN_CONSOLE = b"""(XEN) Freed 656kB init memory
dom0# __VIMS_0123_RC=0
(XEN) d2v0 Triple fault - invoking HVM shutdown action 1
(XEN) *** Dumping Dom2 vcpu#0 state: ***
(XEN) ----[ Xen-4.17.6-pre  x86_64  debug=n  Not tainted ]----
(XEN) Domain 3 (vcpu#0) crashed on cpu#1:
(XEN) *** Dumping Dom0 vcpu#1 state: ***
"""


def test_crashed_domids_reads_xens_own_words() -> None:
    assert crashed_domids(XEN_CONSOLE) == {0, 2, 3}
    assert crashed_domids(b"(XEN) d1v0 RDMSR 0x0000001b unimplemented\n") == set()
    assert crashed_domids(b"") == set()


def test_console_tail_drops_the_exec_framing() -> None:
    raw = (b"cvm# cvm# __VIMS_ab12_OUT\n152\n\n__VIMS_ab12_ERR\n\n__VIMS_ab12_RC=0\n"
           b"cvm# [  219.1] sysrq: Trigger a crash\n"
           b"[  219.2] Kernel panic - not syncing: sysrq triggered crash\n")
    assert console_tail(raw, 2) == ["[  219.1] sysrq: Trigger a crash",
                                    "[  219.2] Kernel panic - not syncing: sysrq triggered crash"]
    assert console_tail(raw, 9)[0] == "152"


def test_console_tail_names_the_panic_above_its_stack_dump() -> None:
    dump = b"".join(b"[  482.4] R%d: 0000000000000000\n" % i for i in range(12))
    raw = (b"cvm# [  482.1] sysrq: Trigger a crash\n"
           b"[  482.2] Kernel panic - not syncing: sysrq triggered crash\n" + dump
           + b"[  482.5] </TASK>\n[  482.6] Kernel Offset: disabled\n")
    tail = console_tail(raw, 2)
    assert tail == ["[  482.2] Kernel panic - not syncing: sysrq triggered crash",
                    "[  482.5] </TASK>", "[  482.6] Kernel Offset: disabled"]


def test_xen_console_tail_keeps_where_a_domain_died(tmp_path: Path) -> None:
    from vims.lab.manager import Lab

    log = tmp_path / "serial.log"
    regs = b"".join(b"(XEN) r%d: 0000000000000000\n" % i for i in range(20))
    log.write_bytes(b"(XEN) Dom0 has maximum 2 VCPUs\n(XEN) Freed 656kB init memory\n"
                    b"dom0# ls\n(XEN) d2v0 Triple fault - invoking HVM shutdown action 1\n"
                    b"(XEN) *** Dumping Dom2 vcpu#0 state: ***\n"
                    b"(XEN) RIP:    0010:[<ffffffff8108a851>]\n" + regs)
    lab = Lab.__new__(Lab)
    object.__setattr__(lab, "serial_log", str(log))
    tail = xen_console_tail(lab, 2)
    assert tail == ["(XEN) d2v0 Triple fault - invoking HVM shutdown action 1",
                    "(XEN) *** Dumping Dom2 vcpu#0 state: ***",
                    "(XEN) RIP:    0010:[<ffffffff8108a851>]",
                    "(XEN) r18: 0000000000000000", "(XEN) r19: 0000000000000000"]
    # Nothing after boot: nothing to say (the boot banner is not news).
    log.write_bytes(b"(XEN) Dom0 has maximum 2 VCPUs\n(XEN) Freed 656kB init memory\n")
    assert xen_console_tail(lab) == []


class _Unanswered(Exception):
    pass


class _MonitorRing:
    """LibVMI's Xen event ring as far as detaching goes (driver/xen/xen_events.c):
    ``listen`` consumes every queued request; one whose register handler is gone is
    consumed but never answered, and its vCPU waits for good."""

    def __init__(self, queued: int, pause_fails: bool = False) -> None:
        self.queued, self.pause_fails = queued, pause_fails
        self.handler, self.paused, self.answered, self.lost = True, False, 0, 0
        self.calls: list[str] = []

    def pause_vm(self) -> None:
        self.calls.append("pause")
        if self.pause_fails:
            raise _Unanswered("pause failed")
        self.paused = True

    def resume_vm(self) -> None:
        self.calls.append("resume")
        self.paused = False

    def clear_event(self, _event: object) -> None:
        self.calls.append("clear")
        self.handler = False

    def are_events_pending(self) -> int:
        return self.queued

    def listen(self, _timeout: int) -> None:
        self.calls.append("listen")
        if self.handler:
            self.answered += self.queued
        else:
            self.lost += self.queued
        self.queued = 0
        if self.lost:
            raise _Unanswered("Unhandled register event caught")


def test_detach_answers_queued_cr3_writes_before_clearing_the_event() -> None:
    from vims.vmi.events import _detach

    ring = _MonitorRing(queued=1)  # a CR3 write trapped after the last listen()
    _detach(ring, object(), _Unanswered)
    assert (ring.answered, ring.lost) == (1, 0)
    assert (ring.calls[0], ring.calls[-1]) == ("pause", "resume")
    assert ring.calls.index("listen") < ring.calls.index("clear")
    assert not ring.paused


def test_detach_leaves_a_domain_it_cannot_pause_to_libvmi_destroy() -> None:
    from vims.vmi.events import _detach

    ring = _MonitorRing(queued=1, pause_fails=True)
    _detach(ring, object(), _Unanswered)
    assert ring.calls == ["pause"]  # nothing cleared with requests still queued
    assert (ring.handler, ring.lost) == (True, 0)


class _Listening:
    """A ring that delivers nothing; on its ``ask_stop_at``-th wait, a signal arrives."""

    def __init__(self, ask_stop_at: int, stop: Stop) -> None:
        self.ask_stop_at, self.stop, self.waits = ask_stop_at, stop, 0

    def listen(self, timeout_ms: int) -> None:
        assert 1 <= timeout_ms <= 500  # every wait is bounded, so a stop is seen in time
        self.waits += 1
        if self.waits == self.ask_stop_at:
            self.stop.set("SIGTERM")


def test_listen_loop_ends_at_a_stop_request_not_at_the_window() -> None:
    from vims.vmi.events import listen_until

    stop = Stop()
    ring = _Listening(ask_stop_at=3, stop=stop)
    listened = listen_until(ring, 3600.0, stop)
    assert ring.waits == 3
    assert listened < 60
    assert stop.signal == "SIGTERM"


def _child(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter: a regression here would kill the process."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)


def test_sigterm_while_monitoring_is_a_stop_request_and_the_handler_comes_back() -> None:
    proc = _child("""
import os, signal
from vims.vmi.events import stop_on_signals
before = signal.getsignal(signal.SIGTERM)
with stop_on_signals() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.flag.wait(5)
    print(stop.signal)
assert signal.getsignal(signal.SIGTERM) is before
print("restored")
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["SIGTERM", "restored"]


def test_vims_unwinds_on_sigterm_like_ctrl_c_so_cleanup_runs() -> None:
    """A command ended by a timeout must still resume what it paused (its ``finally``)."""
    proc = _child("""
import os, signal, sys, time, click
from vims import cli

@click.command()
def term_self():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives here
        print("not interrupted")
    finally:
        print("cleanup ran")

module = type(sys)("vims_test_term")
module.cmd = term_self
sys.modules["vims_test_term"] = module
cli.COMMANDS["term-self"] = "vims_test_term:cmd"
before = signal.getsignal(signal.SIGTERM)
rc = cli.main(["term-self"])
print("rc", rc, "restored", signal.getsignal(signal.SIGTERM) is before)
""")
    assert proc.stdout.splitlines() == ["cleanup ran", "rc 2 restored True"], proc.stderr
    assert "vims: error: interrupted" in proc.stderr


DIRECT = 0xFFFF888000000000  # the direct map: kv2p is a subtraction here


class _Guest:
    """Just enough of GuestMemory for the CR3 cross-view: words at addresses."""

    class profile:
        OFF: ClassVar[dict[tuple[str, str], int]] = {
            ("task_struct", "mm"): 0x10, ("task_struct", "active_mm"): 0x18,
            ("task_struct", "exit_state"): 0x20, ("task_struct", "pid"): 0x24,
            ("task_struct", "comm"): 0x28, ("mm_struct", "pgd"): 0x8,
            ("mm_struct", "mm_users"): 0x10}

        @classmethod
        def offset(cls, struct: str, member: str) -> int:
            return cls.OFF[(struct, member)]

        @staticmethod
        def symbol(name: str) -> int:
            return {"current_task": 0x100}[name]

    def __init__(self) -> None:
        self.words: dict[int, int] = {}
        self.syms = {"__per_cpu_offset": DIRECT + 0x1000}
        self.words[DIRECT + 0x1000] = DIRECT + 0x2000  # CPU 0's per-CPU area
        self.kernel_dtb = 0x9000

    def sym(self, name: str) -> int:
        return self.syms[name]

    def u64(self, addr: int) -> int:
        return self.words.get(addr, 0)

    u32 = i32 = u64

    def cstr(self, addr: int, limit: int = 256) -> str:
        return "task"

    def kv2p(self, vaddr: int) -> int:
        return vaddr - DIRECT

    def flush(self) -> None:
        pass

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        yield

    def task(self, addr: int, pid: int, mm: int, pgd: int = 0) -> int:
        self.words[addr + 0x10] = mm
        self.words[addr + 0x18] = mm
        self.words[addr + 0x24] = pid
        if mm and pgd:
            self.words[mm + 0x8] = DIRECT + pgd
            self.words[mm + 0x10] = 1  # mm_users
        return addr

    def run(self, task: int) -> None:
        self.words[DIRECT + 0x2000 + 0x100] = task


def test_cr3_cross_view_reports_the_unlisted_space_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from vims.vmi import crossview

    g = _Guest()
    listed = g.task(DIRECT + 0xA000, 10, mm=DIRECT + 0xA800, pgd=0x50000)
    hidden = g.task(DIRECT + 0xB000, 66, mm=DIRECT + 0xB800, pgd=0x60000)
    gone = g.task(DIRECT + 0xC000, 20, mm=DIRECT + 0xC800, pgd=0x70000)
    execs = g.task(DIRECT + 0xD000, 30, mm=DIRECT + 0xD800, pgd=0x80000)
    monkeypatch.setattr(crossview, "Linux", lambda _mem: type(
        "L", (), {"tasks": staticmethod(lambda with_threads: [
            type("T", (), {"mm": DIRECT + 0xA800})(),
            type("T", (), {"mm": DIRECT + 0xD800})()])})())
    view = crossview.Cr3CrossView(g)  # type: ignore[arg-type]
    for task, next_root in ((listed, 0x60000 | 5), (hidden, 0x70000), (gone, 0x9000),
                            (gone, 0x90000), (execs, 0x50000 | (1 << 63))):
        g.run(task)
        view.switch(next_root, 0)
    # gone ran on the kernel's tables after exit_mm; execs switched to its new mm's
    # tables (0x80000) before the next write named the pre-exec root 0x90000.
    g.words[gone + 0x10] = 0
    g.words[DIRECT + 0xC800 + 0x10] = 0  # its mm released
    g.run(listed)
    result = view.finish()
    assert [h["pid"] for h in result.hidden] == [66]
    assert result.hidden[0]["cr3"] == "0x60000"
    assert (result.listed, result.exited) == (1, 1)
    assert (result.kernel_switches, result.unattributed_switches) == (1, 1)
    assert result.address_spaces == 3


def test_cross_view_needs_a_profile_and_says_so_before_touching_a_domain() -> None:
    for args in (["--cross-view"], ["--profile", __file__]):
        proc = _child(f"""
from vims import cli
raise SystemExit(cli.main(["events", "cr3", "--domain", "nosuch", *{args!r}]))
""")
        assert proc.returncode == 2, proc.stderr
        assert "--cross-view and --profile go together" in proc.stderr
