"""Facts the checks need from the vendor image itself, not from guest memory.

- the contents of ``sys_call_table`` as linked: the handler every entry must
  point at (before the KASLR slide);
- the text layout for ``kernel.text``: relocation sites and the runtime patch
  sites (jump labels, static calls and their trampolines, ftrace call sites).

Taken from the vmlinux ELF, whose sections hold link-time (unrelocated) values.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping

from elftools.elf.elffile import ELFFile

from vims.vmi.errors import ProfileError
from vims.vmi.ktext import (
    FTRACE_SITE,
    JMP8,
    NOP2,
    STATIC_CALL_SITE,
    TRAMPOLINE,
    PatchSite,
    Site,
    TextLayout,
    build_layout,
)

JUMP_ENTRY = 16  # struct jump_entry { s32 code; s32 target; long key; }
STATIC_CALL_ENTRY = 8  # struct static_call_site { s32 addr; s32 key; }
STATIC_CALL_TAIL = 1  # STATIC_CALL_SITE_TAIL, in the low bits of the key
# The calls inside the ftrace callers that ftrace re-points when it is enabled.
FTRACE_CALLERS = ("ftrace_call", "ftrace_regs_call", "ftrace_graph_call")
MAX_TABLE_BYTES = 64 << 20


class ImageReader:
    """Read link-time virtual addresses of a vmlinux through its section headers."""

    def __init__(self, vmlinux: bytes) -> None:
        self.data = vmlinux
        try:
            elf = ELFFile(io.BytesIO(vmlinux))
            self.sections = [
                (s["sh_addr"], s["sh_size"], s["sh_offset"])
                for s in elf.iter_sections()
                if s["sh_addr"] and s["sh_type"] != "SHT_NOBITS"
            ]
        except Exception as exc:
            raise ProfileError(f"vmlinux ELF section headers unreadable: {exc}") from exc

    def read(self, vaddr: int, size: int) -> bytes:
        if not 0 <= size <= MAX_TABLE_BYTES:
            raise ProfileError(f"table of {size} bytes at 0x{vaddr:x} is implausible")
        for addr, length, offset in self.sections:
            if addr <= vaddr and vaddr + size <= addr + length:
                start = offset + vaddr - addr
                return self.data[start:start + size]
        raise ProfileError(f"0x{vaddr:x}+{size} is not in any loaded section of the vmlinux")


def syscall_table(image: ImageReader, symbols: Mapping[str, int], nr: int) -> list[int]:
    """Handler addresses of ``sys_call_table[0..nr)`` as linked."""
    raw = image.read(symbols["sys_call_table"], 8 * nr)
    return list(struct.unpack(f"<{nr}Q", raw))


def _bounds(symbols: Mapping[str, int], start: str, stop: str) -> tuple[int, int]:
    if start not in symbols or stop not in symbols:
        return 0, 0
    lo, hi = symbols[start], symbols[stop]
    if hi < lo:
        raise ProfileError(f"{stop} is below {start}")
    return lo, hi


def _table(image: ImageReader, symbols: Mapping[str, int], name: str) -> tuple[int, bytes]:
    """Start address and bytes of the linker table ``__start_<name>..__stop_<name>``."""
    lo, hi = _bounds(symbols, f"__start_{name}", f"__stop_{name}")
    return lo, image.read(lo, hi - lo) if hi > lo else b""


def _relative_pairs(image: ImageReader, symbols: Mapping[str, int], name: str,
                    entry_size: int) -> list[tuple[int, int]]:
    """(site, second field) of a table whose entries start with two s32 self-relative
    offsets (``struct jump_entry``'s code and target, ``static_call_site``'s addr and key)."""
    lo, raw = _table(image, symbols, name)
    out = []
    for i in range(0, len(raw) - entry_size + 1, entry_size):
        code, other = struct.unpack_from("<ii", raw, i)
        out.append((lo + i + code, lo + i + 4 + other))
    return out


def _jump_length(image: ImageReader, site: int) -> int:
    """2 for a short jump label (objtool's 2-byte NOP or a jmp8), else 5."""
    try:
        head = image.read(site, 2)
    except ProfileError:
        return 5
    return 2 if head == NOP2 or head[:1] == bytes([JMP8]) else 5


def text_layout(image: ImageReader, symbols: Mapping[str, int], relocs: bytes) -> TextLayout:
    """Relocation and runtime patch sites inside ``[_stext, _etext)``."""
    sites = [PatchSite(code, _jump_length(image, code), Site.JUMP_LABEL, target)
             for code, target in _relative_pairs(image, symbols, "__jump_table", JUMP_ENTRY)]
    for addr, key in _relative_pairs(image, symbols, "static_call_sites", STATIC_CALL_ENTRY):
        kind = Site.STATIC_CALL_TAIL if key & STATIC_CALL_TAIL else Site.STATIC_CALL
        sites.append(PatchSite(addr, STATIC_CALL_SITE, kind))
    _, raw = _table(image, symbols, "mcount_loc")
    sites += [PatchSite(a, FTRACE_SITE, Site.FTRACE)
              for a in struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8])]
    sites += [PatchSite(a, TRAMPOLINE, Site.TRAMPOLINE)
              for n, a in symbols.items() if n.startswith("__SCT__")]
    sites += [PatchSite(symbols[n], FTRACE_SITE, Site.FTRACE_CALLER)
              for n in FTRACE_CALLERS if n in symbols]
    return build_layout(symbols["_stext"], symbols["_etext"], relocs, sites)
