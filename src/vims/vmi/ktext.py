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

Speed: the baseline keeps the clean text with relocations undone (masks not
applied). A check re-applies the current slide to it once per boot (cached),
then compares the guest's text with one memcmp; only pages that differ are
looked at again with their patch sites masked.
"""

from __future__ import annotations

import array
import base64
import functools
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

    @functools.cached_property
    def page_masks(self) -> dict[int, list[tuple[int, int]]]:
        """Patch sites by text page, for the slow path of a comparison."""
        pages: dict[int, list[tuple[int, int]]] = {}
        for off, length in self.masks:
            for page in {off // PAGE, (off + length - 1) // PAGE}:
                pages.setdefault(page, []).append((off, length))
        return pages

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


def _shift(text: bytearray, layout: TextLayout, delta: int) -> None:
    """Add ``delta`` at every relocation site (subtract it at inverse ones)."""
    m32, m64 = 0xFFFFFFFF, (1 << 64) - 1
    u32, u64 = struct.Struct("<I"), struct.Struct("<Q")
    for off in layout.abs32:
        u32.pack_into(text, off, (u32.unpack_from(text, off)[0] + delta) & m32)
    for off in layout.inv32:
        u32.pack_into(text, off, (u32.unpack_from(text, off)[0] - delta) & m32)
    for off in layout.abs64:
        u64.pack_into(text, off, (u64.unpack_from(text, off)[0] + delta) & m64)


def unrelocate(text: bytearray, layout: TextLayout, slide: int) -> None:
    """Undo the KASLR slide at relocation sites: the text as linked."""
    _shift(text, layout, -slide)


def relocate(text: bytearray, layout: TextLayout, slide: int) -> None:
    """Apply a KASLR slide at relocation sites, as the decompressor did."""
    _shift(text, layout, slide)


def read_text(mem: GuestMemory) -> bytearray:
    """The guest's kernel text as it is now, ``[_stext, _etext)``."""
    buf = bytearray(mem.profile.text_layout.size)
    mem.read_into(mem.sym("_stext"), buf)
    return buf


def normalized_text(mem: GuestMemory) -> bytes:
    """The guest's kernel text with relocations undone (for a baseline)."""
    text = read_text(mem)
    unrelocate(text, mem.profile.text_layout, mem.kaslr_offset)
    return bytes(text)


def encode_text(text: bytes) -> dict[str, str]:
    import zstandard

    return {"encoding": "zstd+base64", "sha256": hashlib.sha256(text).hexdigest(),
            "data": base64.b64encode(zstandard.ZstdCompressor(level=6).compress(text)).decode()}


def decode_text(entry: dict[str, str], size: int) -> bytes:
    import zstandard

    if entry.get("encoding") != "zstd+base64":
        raise ValueError(f"unknown kernel text encoding {entry.get('encoding')!r}")
    data = zstandard.ZstdDecompressor().decompress(base64.b64decode(entry["data"]),
                                                   max_output_size=size)
    if len(data) != size or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError("baseline kernel text is corrupt or for another kernel")
    return data


@dataclass(frozen=True)
class TextDiff:
    """A stretch of kernel text that differs from the baseline outside patch sites."""

    offset: int  # from _stext
    expected: bytes
    found: bytes


_EXPECTED: dict[tuple[str, int], bytes] = {}


def expected_text(entry: dict[str, str], layout: TextLayout, slide: int) -> bytes:
    """The baseline text relocated for ``slide``; cached, since a slide lasts a boot."""
    key = (entry["sha256"], slide)
    cached = _EXPECTED.get(key)
    if cached is None:
        text = bytearray(decode_text(entry, layout.size))
        relocate(text, layout, slide)
        cached = bytes(text)
        _EXPECTED.clear()  # one guest boot at a time per process is the common case
        _EXPECTED[key] = cached
    return cached




def compare_text(found: bytes | bytearray, expected: bytes, layout: TextLayout,
                 max_diffs: int = 64) -> list[TextDiff]:
    """Differences outside runtime patch sites, one per differing stretch."""
    if found == expected:
        return []
    masks = layout.page_masks
    diffs: list[TextDiff] = []
    view_f, view_e = memoryview(found), memoryview(expected)
    for page in range(0, (len(found) + PAGE - 1) // PAGE):
        lo, hi = page * PAGE, min(len(found), (page + 1) * PAGE)
        if view_f[lo:hi] == view_e[lo:hi]:
            continue
        f, e = bytearray(found[lo:hi]), bytearray(expected[lo:hi])
        for off, length in masks.get(page, []):
            a, b = max(off, lo) - lo, min(off + length, hi) - lo
            f[a:b] = e[a:b] = bytes(b - a)
        if f == e:
            continue  # only patch sites changed: legitimate
        i = 0
        while i < len(f) and len(diffs) < max_diffs:
            if f[i] == e[i]:
                i += 1
                continue
            j = i
            while j < len(f) and f[j] != e[j] and j - i < 64:
                j += 1
            diffs.append(TextDiff(lo + i, bytes(e[i:j]), bytes(f[i:j])))
            i = j
    return diffs
