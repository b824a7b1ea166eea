"""Find and parse the kernel's VMCOREINFO note in raw guest memory.

The kernel keeps a text note (``OSRELEASE=...``, ``BUILD-ID=...``,
``KERNELOFFSET=...``, ``SYMBOL(name)=addr``) in memory for crash dumps. Reading
it needs no profile, so it is the first thing the A-VM can see of a C-VM:
which kernel runs and where KASLR put it.

The note lives in guest memory, which the guest controls: a rootkit can plant a
fake one. Parsing is bounded and strict, and callers must cross-check what it
says (e.g. against the profile's build-id and symbol addresses).
"""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path

MAX_NOTE_BYTES = 16 << 10
_KEY = re.compile(rb"^[A-Z][A-Z_-]*(\([A-Za-z0-9_.]+\))?$")


@dataclass(frozen=True)
class VmcoreInfo:
    """One parsed VMCOREINFO note and the physical address it was found at."""

    phys_addr: int
    fields: dict[str, str] = field(repr=False)

    @property
    def release(self) -> str:
        return self.fields.get("OSRELEASE", "")

    @property
    def build_id(self) -> str:
        return self.fields.get("BUILD-ID", "")

    @property
    def kaslr_offset(self) -> int | None:
        value = self.fields.get("KERNELOFFSET")
        return int(value, 16) if value is not None else None

    def symbol(self, name: str) -> int | None:
        value = self.fields.get(f"SYMBOL({name})")
        return int(value, 16) if value is not None else None


def parse_note(raw: bytes, phys_addr: int = 0) -> VmcoreInfo | None:
    """Parse note text (``KEY=value`` lines); None unless it is well formed."""
    fields: dict[str, str] = {}
    for line in raw.split(b"\n"):
        if not line:
            continue
        key, sep, value = line.partition(b"=")
        if not sep or not _KEY.match(key) or len(value) > 256:
            return None
        try:
            fields[key.decode()] = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not fields.get("OSRELEASE") or "%" in fields["OSRELEASE"]:
        return None
    return VmcoreInfo(phys_addr=phys_addr, fields=fields)


def scan(memory: bytes | mmap.mmap, limit: int = 8) -> list[VmcoreInfo]:
    """All well-formed notes in ``memory`` (at most ``limit``), in address order."""
    found: list[VmcoreInfo] = []
    pos = 0
    while len(found) < limit:
        pos = memory.find(b"OSRELEASE=", pos)
        if pos < 0:
            break
        end = memory.find(b"\0", pos, pos + MAX_NOTE_BYTES)
        if end > pos:
            note = parse_note(bytes(memory[pos:end]), pos)
            if note is not None:
                found.append(note)
        pos += 1
    return found


def scan_file(path: Path) -> list[VmcoreInfo]:
    """Scan a raw physical-memory file (live RAM file or snapshot)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mem:
        return scan(mem)
