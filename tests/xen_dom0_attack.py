"""Run in dom0 by tests/integration/test_xen_lab.py: a rootkit's edits of a domU, and checks.

``python xen_dom0_attack.py DOMAIN ATTACK:CHECK ...`` opens the domain once
through LibVMI's XEN driver (Python and LibVMI start slowly under nested TCG)
and, for each pair, pauses the domain, applies ATTACK by writing the domU's
memory, runs CHECK on the modified memory, undoes the edit and resumes. Then
one more CHECK round per pair on the restored memory. Prints
``{ATTACK: {"attacked": report, "after": report}}`` as JSON. The files it
reads are on the lab's share.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from attacks import patched, unlinked  # tests/attacks.py, copied next to this file
from vims.baseline import load
from vims.checks.runner import run_round
from vims.vmi.linux import Linux
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

SHARE = Path("/vims")


def attack(mem: GuestMemory, kind: str) -> AbstractContextManager[object]:
    if kind == "none":
        return nullcontext()
    if kind == "syscall":
        table = mem.sym("sys_call_table")
        return patched(mem, table + 39 * 8, struct.pack("<Q", mem.u64(table)))
    if kind == "text":
        return patched(mem, mem.sym("__x64_sys_kexec_load") + 0x10, b"\x90\x90\x90\x90")
    if kind == "idt":
        gate = mem.sym("idt_table") + 3 * 16
        low = mem.read(gate, 2)
        return patched(mem, gate, bytes([low[0] ^ 0x40, low[1]]))
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
def opened(domain: str) -> Iterator[GuestMemory]:
    profile = Profile.load(SHARE / "profile.json")
    with GuestMemory(profile, domain=domain, mode="xen") as mem:
        yield mem


def main() -> None:
    domain, pairs = sys.argv[1], [a.split(":", 1) for a in sys.argv[2:]]
    baseline = load(SHARE / f"baseline-{domain}.json")
    policy = json.loads((SHARE / "policy.json").read_text())
    out = {}
    with opened(domain) as mem:
        for kind, check in pairs:
            with mem.paused(), attack(mem, kind):
                mem.flush()
                attacked = run_round(mem, [check], baseline, policy, "none",
                                     {"domain": domain})
            after = run_round(mem, [check], baseline, policy, "pause", {"domain": domain})
            out[kind] = {"attacked": attacked, "after": after}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
