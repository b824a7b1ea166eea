"""A host-side rootkit for the one-machine lab (playbooks/lab-attack.yml).

    lab_rootkit.py hook|undo RAM PROFILE STATE

``hook`` points the C-VM's sys_call_table entry of kexec_load (never called in
the lab) at getpid's handler, writing guest RAM from outside while the guest is
paused, as kernel malware would from inside; the original entry is kept in
STATE. ``undo`` puts it back. Prints ``changed`` or ``unchanged``. Runs with the
VIMS runtime's Python.
"""

import sys
from pathlib import Path

from vims.checks.cli import open_memory
from vims.vmi.profile import Profile

KEXEC_LOAD, GETPID = 246, 39


def main(argv):
    if len(argv) != 5 or argv[1] not in ("hook", "undo"):
        sys.stderr.write(__doc__)
        return 2
    action, ram, profile, state = argv[1], Path(argv[2]), Path(argv[3]), Path(argv[4])
    with open_memory(Profile.load(profile), ram, None) as mem, mem.paused():
        mem.flush()
        table = mem.sym("sys_call_table")
        slot = table + KEXEC_LOAD * 8
        current = mem.read(slot, 8)
        if action == "hook":
            hooked = mem.read(table + GETPID * 8, 8)
            if current == hooked:
                print("unchanged")
                return 0
            state.write_text(current.hex() + "\n")
            mem.write(slot, hooked)
        else:
            if not state.exists():
                print("unchanged")
                return 0
            original = bytes.fromhex(state.read_text().strip())
            if current != original:
                mem.write(slot, original)
            state.unlink()
    print("changed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
