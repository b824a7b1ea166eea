"""Run in dom0 by tests/integration/test_xen_lab.py: a rootkit's edits of a domU, and checks.

``python xen_dom0_attack.py DOMAIN ATTACK:CHECK ...`` opens the domain once
through LibVMI's XEN driver (Python and LibVMI start slowly under nested TCG)
and, for each pair, pauses the domain, applies ATTACK by writing the domU's
memory, runs CHECK on the modified memory, undoes the edit, verifies that the
original bytes are back and resumes. Then one more CHECK round per pair on the
restored memory. Prints ``{ATTACK: {"attacked": report, "after": report}}`` as
JSON. The files it reads are on the lab's share.

The domU must survive this (tests run on after it), so every edit is made
safe twice over: it is written only while ``xl list`` shows the domain paused,
and undone before it runs again; and each edit would do no harm if the domU
did run with it (a gate and a table slot aimed at real handlers, text patched
in a function nothing calls, a sleeping task unlinked the way rootkits do).
SIGTERM (dom0's ``timeout``) unwinds like an exception, so an edit is never
left in place nor the domain left paused.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from types import FrameType

from attacks import patched, unlinked  # tests/attacks.py, copied next to this file
from vims.baseline import load
from vims.checks.runner import run_round
from vims.vmi.linux import Linux
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

SHARE = Path("/vims")
IDT_HOOKED = 4  # #OF: INTO does not exist in 64-bit mode, so nothing raises it
IDT_DONOR = 5  # #BR: its handler is real entry code (BOUND is gone in 64-bit mode too)


def xl_state(domain: str) -> str:
    """The state flags ``xl list`` shows for ``domain`` (``--p---`` when paused)."""
    out = subprocess.run(["xl", "list", domain], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return out.splitlines()[-1].split()[4]


def attack(mem: GuestMemory, kind: str) -> AbstractContextManager[object]:
    if kind == "none":
        return nullcontext()
    if kind == "syscall":
        # getpid's slot -> read's handler. Debian's 6.1 dispatches through x64_sys_call(),
        # not the table, and read's handler is a real function either way.
        table = mem.sym("sys_call_table")
        return patched(mem, table + 39 * 8, struct.pack("<Q", mem.u64(table)))
    if kind == "text":
        # Bytes inside kexec_load's handler: nothing in the lab calls kexec_load.
        return patched(mem, mem.sym("__x64_sys_kexec_load") + 0x10, b"\x90\x90\x90\x90")
    if kind == "idt":
        # A gate aimed at another real handler (offset fields only), on a vector that
        # 64-bit code never raises. Not #BP: the kernel's own text patching (jump labels,
        # static calls) raises int3, so a bad #BP gate is fatal the moment the domU runs.
        idt = mem.sym("idt_table")
        donor = mem.read(idt + IDT_DONOR * 16, 16)
        gate = bytearray(mem.read(idt + IDT_HOOKED * 16, 16))
        gate[0:2], gate[6:12] = donor[0:2], donor[6:12]
        return patched(mem, idt + IDT_HOOKED * 16, bytes(gate))
    if kind == "hide_sleep":
        victim = next(t for t in Linux(mem).tasks() if t.comm == "sleep")
        print(json.dumps({"victim": victim.pid}), file=sys.stderr)
        return unlinked(mem, victim.address + mem.profile.offset("task_struct", "tasks"))
    if kind == "root_cred":
        victim = next(t for t in Linux(mem).tasks() if t.comm == "sleep" and t.uid == 1000)
        print(json.dumps({"victim": victim.pid}), file=sys.stderr)
        return patched(mem, victim.cred + mem.profile.offset("cred", "uid"), bytes(32))
    raise SystemExit(f"unknown attack {kind}")


@contextmanager
def restored(mem: GuestMemory, spans: list[tuple[int, int]]) -> Iterator[None]:
    """Fail loudly unless the bytes of ``spans`` (vaddr, size) read as before, afterwards."""
    before = [mem.read(addr, size) for addr, size in spans]
    yield
    mem.flush()
    for (addr, size), old in zip(spans, before, strict=True):
        if mem.read(addr, size) != old:
            raise SystemExit(f"edit at 0x{addr:x} was not undone")


def watched(mem: GuestMemory, kind: str) -> list[tuple[int, int]]:
    """Memory that ``kind`` edits (what ``restored`` compares): the whole object."""
    if kind in ("syscall", "text", "idt"):
        return [{"syscall": (mem.sym("sys_call_table"), 451 * 8),
                 "text": (mem.sym("__x64_sys_kexec_load"), 64),
                 "idt": (mem.sym("idt_table"), 256 * 16)}[kind]]
    return []  # list and cred edits: their own undo rewrites every word they touched


@contextmanager
def opened(domain: str) -> Iterator[GuestMemory]:
    profile = Profile.load(SHARE / "profile.json")
    with GuestMemory(profile, domain=domain, mode="xen") as mem:
        yield mem


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}: edits undone, domain resumed")


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    domain, pairs = sys.argv[1], [a.split(":", 1) for a in sys.argv[2:]]
    baseline = load(SHARE / f"baseline-{domain}.json")
    policy = json.loads((SHARE / "policy.json").read_text())
    out = {}
    with opened(domain) as mem:
        for kind, check in pairs:
            with mem.paused():
                state = xl_state(domain)
                if "p" not in state:
                    raise SystemExit(f"{domain} is not paused ({state}): no write into it")
                with restored(mem, watched(mem, kind)), attack(mem, kind):
                    mem.flush()
                    attacked = run_round(mem, [check], baseline, policy, "none",
                                         {"domain": domain})
            after = run_round(mem, [check], baseline, policy, "pause", {"domain": domain})
            out[kind] = {"attacked": attacked, "after": after}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
