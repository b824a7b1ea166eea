"""A host-side rootkit for tests: edits guest memory the way kernel malware would.

Every attack is a context manager that applies the change and undoes it on
exit (callers hold the guest paused), so one booted guest serves the session.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

from vims.vmi.memory import GuestMemory


@contextmanager
def patched(mem: GuestMemory, vaddr: int, data: bytes) -> Iterator[bytes]:
    """Overwrite kernel virtual memory; restore the original bytes afterwards."""
    original = mem.read(vaddr, len(data))
    mem.write(vaddr, data)
    try:
        yield original
    finally:
        mem.write(vaddr, original)


def list_del_init(mem: GuestMemory, entry: int) -> tuple[int, int]:
    """Unlink a ``list_head`` the way DKOM does; its (next, prev) before.

    The entry then points at itself, so the kernel's own unlink of it (at exit)
    touches nothing else: a task hidden this way may run, and die, safely.
    """
    nxt, prev = struct.unpack("<QQ", mem.read(entry, 16))
    mem.write(prev, struct.pack("<Q", nxt))
    mem.write(nxt + 8, struct.pack("<Q", prev))
    mem.write(entry, struct.pack("<QQ", entry, entry))
    return nxt, prev


@contextmanager
def unlinked(mem: GuestMemory, entry: int) -> Iterator[None]:
    """``list_del_init`` an entry (DKOM), then put it back where it was."""
    nxt, prev = list_del_init(mem, entry)
    try:
        yield
    finally:
        mem.write(entry, struct.pack("<QQ", nxt, prev))
        mem.write(prev, struct.pack("<Q", entry))
        mem.write(nxt + 8, struct.pack("<Q", entry))
