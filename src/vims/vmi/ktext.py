"""Kernel text, made comparable across boots.

Design (documented choice for ``kernel.text``): compare with a *clean-boot
baseline*, not with the vendor image. Boot-time patching (alternatives,
paravirt, retpolines, return thunks) is applied once while booting from tables
that are freed afterwards; a clean boot on the same platform inherits exactly
those patches, so the baseline needs no re-implementation of them. What still
differs between two clean boots is removed before hashing:

- KASLR relocations: the bzImage's relocation table (which the decompressor
  applied) lists every text location holding an absolute kernel address; the
  slide is subtracted back at each of them;
- runtime patch sites: jump labels (``__jump_table``), static calls
  (``static_call_sites`` and ``__SCT__`` trampolines) and ftrace call sites
  (``__mcount_loc``) are masked. Their locations come from the vendor image
  through the profile, never from the guest, so a rootkit cannot widen the mask
  by forging table entries in guest memory.

Everything else that differs from the baseline is a finding.
"""

from __future__ import annotations

import array
import base64
import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vims.vmi.memory import GuestMemory

PAGE = 4096
START_KERNEL_MAP = 0xFFFFFFFF80000000
JUMP_SITE = 5  # JUMP_LABEL_NOP_SIZE / a rel32 jmp or call
STATIC_CALL_SITE = 5
TRAMPOLINE = 8
FTRACE_SITE = 5


def pack_u32(values: list[int]) -> str:
    return base64.b64encode(array.array("I", values).tobytes()).decode()


def unpack_u32(text: str) -> list[int]:
    arr = array.array("I")
    arr.frombytes(base64.b64decode(text))
    return arr.tolist()


@dataclass(frozen=True)
class TextLayout:
    """Where text needs un-relocating or masking, as offsets from ``_stext``."""

    size: int
    abs32: list[int]
    inv32: list[int]
    abs64: list[int]
    masks: list[tuple[int, int]]  # (offset, length)

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "abs32": pack_u32(self.abs32), "inv32": pack_u32(self.inv32),
                "abs64": pack_u32(self.abs64),
                "mask_offsets": pack_u32([o for o, _ in self.masks]),
                "mask_lengths": pack_u32([n for _, n in self.masks])}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> TextLayout:
        offs = unpack_u32(str(data["mask_offsets"]))
        lens = unpack_u32(str(data["mask_lengths"]))
        return cls(size=int(str(data["size"])), abs32=unpack_u32(str(data["abs32"])),
                   inv32=unpack_u32(str(data["inv32"])), abs64=unpack_u32(str(data["abs64"])),
                   masks=list(zip(offs, lens, strict=True)))


def parse_relocs(relocs: bytes) -> tuple[list[int], list[int], list[int]]:
    """Parse the x86 ``relocs`` table appended to vmlinux in a bzImage.

    Read from the end, as arch/x86/boot/compressed/misc.c does: 32-bit
    relocations, a zero, inverse 32-bit ones, a zero, 64-bit ones, a zero. Each
    entry is a sign-extended 32-bit kernel virtual address. Returns virtual
    addresses (abs32, inv32, abs64).
    """
    words = struct.unpack(f"<{len(relocs) // 4}I", relocs[: len(relocs) // 4 * 4])
    groups: list[list[int]] = [[], [], []]
    i = len(words) - 1
    for group in groups:
        while i >= 0 and words[i]:
            w = words[i]
            group.append(w | 0xFFFFFFFF00000000 if w & 0x80000000 else w)
            i -= 1
        i -= 1  # the zero separator
    return groups[0], groups[1], groups[2]


def build_layout(stext: int, etext: int, relocs: bytes, jump_sites: list[int],
                 static_call_sites: list[int], trampolines: list[int],
                 mcount_sites: list[int]) -> TextLayout:
    """Combine relocations and patch sites (all unrelocated addresses) for ``[stext, etext)``."""
    abs32, inv32, abs64 = parse_relocs(relocs) if relocs else ([], [], [])

    def inside(addrs: list[int], width: int) -> list[int]:
        return sorted(a - stext for a in addrs if stext <= a and a + width <= etext)

    masks = sorted(
        [(o, JUMP_SITE) for o in inside(jump_sites, JUMP_SITE)]
        + [(o, STATIC_CALL_SITE) for o in inside(static_call_sites, STATIC_CALL_SITE)]
        + [(o, TRAMPOLINE) for o in inside(trampolines, TRAMPOLINE)]
        + [(o, FTRACE_SITE) for o in inside(mcount_sites, FTRACE_SITE)]
    )
    return TextLayout(size=etext - stext, abs32=inside(abs32, 4), inv32=inside(inv32, 4),
                      abs64=inside(abs64, 8), masks=masks)


def normalize(text: bytearray, layout: TextLayout, slide: int) -> None:
    """Undo the KASLR slide at relocation sites and zero the runtime patch sites."""
    m32 = 0xFFFFFFFF
    for off in layout.abs32:
        (v,) = struct.unpack_from("<I", text, off)
        struct.pack_into("<I", text, off, (v - slide) & m32)
    for off in layout.inv32:
        (v,) = struct.unpack_from("<I", text, off)
        struct.pack_into("<I", text, off, (v + slide) & m32)
    for off in layout.abs64:
        (v,) = struct.unpack_from("<Q", text, off)
        struct.pack_into("<Q", text, off, (v - slide) & (1 << 64) - 1)
    for off, length in layout.masks:
        text[off:off + length] = bytes(length)


@dataclass
class TextPages:
    digests: list[str]


def page_digests(text: bytes) -> list[str]:
    return [hashlib.sha256(text[i:i + PAGE]).hexdigest()[:32] for i in range(0, len(text), PAGE)]


def read_text(mem: GuestMemory) -> bytes:
    return mem.read(mem.sym("_stext"), mem.profile.text_layout.size)


def normalized_text_pages(mem: GuestMemory) -> TextPages:
    """Per-page digests of the guest's kernel text, normalized for comparison."""
    layout = mem.profile.text_layout
    text = bytearray(read_text(mem))
    normalize(text, layout, mem.kaslr_offset)
    return TextPages(page_digests(bytes(text)))
