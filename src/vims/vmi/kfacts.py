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
from vims.vmi.ktext import TextLayout, build_layout

JUMP_ENTRY = 16  # struct jump_entry { s32 code; s32 target; long key; }
STATIC_CALL_SITE = 8  # struct static_call_site { s32 addr; s32 key; }
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


def _relative_sites(image: ImageReader, symbols: Mapping[str, int], name: str,
                    entry_size: int) -> list[int]:
    """Sites of a table whose entries start with an s32 offset relative to themselves."""
    lo, raw = _table(image, symbols, name)
    return [lo + i + struct.unpack_from("<i", raw, i)[0]
            for i in range(0, len(raw) - entry_size + 1, entry_size)]


def text_layout(image: ImageReader, symbols: Mapping[str, int], relocs: bytes) -> TextLayout:
    """Relocation and runtime patch sites inside ``[_stext, _etext)``."""
    jump_sites = _relative_sites(image, symbols, "__jump_table", JUMP_ENTRY)
    static_sites = _relative_sites(image, symbols, "static_call_sites", STATIC_CALL_SITE)
    _, raw = _table(image, symbols, "mcount_loc")
    mcount = list(struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8]))
    trampolines = [a for n, a in symbols.items() if n.startswith("__SCT__")]
    return build_layout(symbols["_stext"], symbols["_etext"], relocs, jump_sites, static_sites,
                        trampolines, mcount)
