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
  (``static_call_sites`` and ``__SCT__`` trampolines), ftrace call sites
  (``__mcount_loc``) and the calls inside the ftrace callers (``ftrace_call``,
  ``ftrace_regs_call``) legitimately change while the kernel runs. Their
  locations, sizes and (for jump labels) targets come from the vendor image
  through the profile, never from the guest, so a rootkit cannot widen the mask
  by forging table entries in guest memory.

A patch site is not a blind spot: whatever it holds must be one of its
legitimate encodings (:func:`judge_site`): a jump label a NOP or a jump to its
own entry's target, an ftrace site a NOP or a call to the ftrace callers or to a
trampoline the ftrace walk accounts for, a static call a call or jump into known
code. A ``jmp hook`` written over a function's fentry NOP is a finding like any
other text change. Everything else that differs from the baseline is a finding.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vims.vmi.memory import GuestMemory

PAGE = 4096
START_KERNEL_MAP = 0xFFFFFFFF80000000
STATIC_CALL_SITE = 5
TRAMPOLINE = 8  # rel32 jmp + the "ud1 %esp,%ecx" signature (0f b9 cc)
FTRACE_SITE = 5


class Site(IntEnum):
    """What kind of runtime patch site a mask covers (stored in the profile)."""

    JUMP_LABEL = 1
    STATIC_CALL = 2
    STATIC_CALL_TAIL = 3  # a static call in tail position: a jmp, or a ret when NULL
    TRAMPOLINE = 4  # __SCT__* static call trampolines
    FTRACE = 5  # __fentry__ call sites (__mcount_loc)
    FTRACE_CALLER = 6  # the call inside ftrace_caller / ftrace_regs_caller


NOP2 = bytes.fromhex("6690")
NOP5 = bytes.fromhex("0f1f440000")
RET5 = (bytes.fromhex("c3cccccccc"), bytes.fromhex("c3cc909090"))  # a NULL static call
CALL, JMP, JMP8 = 0xE8, 0xE9, 0xEB


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
    # Parallel to ``masks``: the kind of each site and, for a jump label, its entry's
    # target (offset from _stext; 0 for other kinds).
    kinds: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)

    @functools.cached_property
    def page_masks(self) -> dict[int, list[int]]:
        """Indexes of the patch sites on each text page, for the slow path of a comparison."""
        pages: dict[int, list[int]] = {}
        for i, (off, length) in enumerate(self.masks):
            for page in {off // PAGE, (off + length - 1) // PAGE}:
                pages.setdefault(page, []).append(i)
        return pages

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "abs32": pack_u32(self.abs32), "inv32": pack_u32(self.inv32),
                "abs64": pack_u32(self.abs64),
                "mask_offsets": pack_u32([o for o, _ in self.masks]),
                "mask_lengths": pack_u32([n for _, n in self.masks]),
                "mask_kinds": pack_u32(self.kinds), "mask_targets": pack_u32(self.targets)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> TextLayout:
        offs = unpack_u32(str(data["mask_offsets"]))
        lens = unpack_u32(str(data["mask_lengths"]))
        kinds = unpack_u32(str(data.get("mask_kinds", "")))
        targets = unpack_u32(str(data.get("mask_targets", "")))
        if len(kinds) != len(offs) or len(targets) != len(offs):
            # A profile of an older format: its masks would be blind spots.
            raise ValueError("the profile's kernel text layout has no patch-site kinds "
                             "(rebuild the profile)")
        return cls(size=int(str(data["size"])), abs32=unpack_u32(str(data["abs32"])),
                   inv32=unpack_u32(str(data["inv32"])), abs64=unpack_u32(str(data["abs64"])),
                   masks=list(zip(offs, lens, strict=True)), kinds=kinds, targets=targets)


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


@dataclass(frozen=True)
class PatchSite:
    """One runtime patch site as linked: address, length, kind, jump-label target."""

    address: int
    length: int
    kind: Site
    target: int = 0


def build_layout(stext: int, etext: int, relocs: bytes, sites: list[PatchSite]) -> TextLayout:
    """Combine relocations and patch sites (all unrelocated addresses) for ``[stext, etext)``."""
    abs32, inv32, abs64 = parse_relocs(relocs) if relocs else ([], [], [])

    def inside(addrs: list[int], width: int) -> list[int]:
        return sorted(a - stext for a in addrs if stext <= a and a + width <= etext)

    kept = sorted((s for s in sites if stext <= s.address and s.address + s.length <= etext),
                  key=lambda s: s.address)
    return TextLayout(size=etext - stext, abs32=inside(abs32, 4), inv32=inside(inv32, 4),
                      abs64=inside(abs64, 8),
                      masks=[(s.address - stext, s.length) for s in kept],
                      kinds=[int(s.kind) for s in kept],
                      targets=[s.target - stext if s.target else 0 for s in kept])


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


@dataclass(frozen=True)
class SiteChange:
    """A runtime patch site whose bytes differ from the clean boot's."""

    offset: int  # from _stext
    kind: Site
    expected: bytes
    found: bytes
    target: int  # a jump label's own target, offset from _stext (else 0)


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
                 max_diffs: int = 64) -> tuple[list[TextDiff], list[SiteChange]]:
    """Differences outside runtime patch sites, one per differing stretch, and the
    patch sites whose bytes changed (each to be judged by :func:`judge_site`)."""
    if found == expected:
        return [], []
    diffs: list[TextDiff] = []
    changed: dict[int, SiteChange] = {}
    view_f, view_e = memoryview(found), memoryview(expected)
    for page in range(0, (len(found) + PAGE - 1) // PAGE):
        lo, hi = page * PAGE, min(len(found), (page + 1) * PAGE)
        if view_f[lo:hi] == view_e[lo:hi]:
            continue
        f, e = bytearray(found[lo:hi]), bytearray(expected[lo:hi])
        for i in layout.page_masks.get(page, []):
            off, length = layout.masks[i]
            if i not in changed and found[off:off + length] != expected[off:off + length]:
                changed[i] = SiteChange(off, Site(layout.kinds[i]),
                                        bytes(expected[off:off + length]),
                                        bytes(found[off:off + length]), layout.targets[i])
            a, b = max(off, lo) - lo, min(off + length, hi) - lo
            f[a:b] = e[a:b] = bytes(b - a)
        if f == e:
            continue
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
    return diffs, [changed[i] for i in sorted(changed)]


def branch_target(site: int, code: bytes) -> int | None:
    """Where a rel32 call/jmp or a jmp8 at ``site`` goes (None for anything else)."""
    if len(code) >= 5 and code[0] in (CALL, JMP):
        rel: int = struct.unpack_from("<i", code, 1)[0]
        return (site + 5 + rel) & (1 << 64) - 1
    if len(code) >= 2 and code[0] == JMP8:
        rel8: int = struct.unpack_from("<b", code, 1)[0]
        return (site + 2 + rel8) & (1 << 64) - 1
    return None


def judge_site(change: SiteChange, site: int, jump_target: int,
               known_code: Callable[[int], bool], ftrace_target: Callable[[int], bool],
               ) -> str | None:
    """Why a changed patch site is illegitimate, or None if it holds a legitimate encoding.

    ``site`` and ``jump_target`` are runtime addresses; ``known_code`` says whether an
    address is kernel or known-module text, ``ftrace_target`` whether it is an ftrace
    caller or a trampoline/direct target the ftrace walk accounts for.
    """
    code, kind = change.found, change.kind
    target = branch_target(site, code)
    if kind is Site.JUMP_LABEL:
        nop = NOP2 if len(code) == 2 else NOP5
        opcode = JMP8 if len(code) == 2 else JMP
        if code == nop or (code[0] == opcode and target == jump_target):
            return None
        return "jump label site holds neither its NOP nor a jump to its own target"
    if kind is Site.TRAMPOLINE:
        if code[5:] != change.expected[5:]:
            return "static call trampoline signature overwritten"
        head = code[:5]
        if head in RET5 or (head[0] == JMP and target is not None and known_code(target)):
            return None
        return "static call trampoline jumps outside known code"
    if kind in (Site.STATIC_CALL, Site.STATIC_CALL_TAIL):
        opcode = JMP if kind is Site.STATIC_CALL_TAIL else CALL
        if code == NOP5 or (kind is Site.STATIC_CALL_TAIL and code in RET5):
            return None
        if code[0] == opcode and target is not None and known_code(target):
            return None
        return "static call site holds no call into known code"
    if kind is Site.FTRACE:
        if code == NOP5 or (code[0] == CALL and target is not None and ftrace_target(target)):
            return None
        return "ftrace site holds neither its NOP nor a call the ftrace walk accounts for"
    if kind is Site.FTRACE_CALLER:
        if code[0] == CALL and target is not None and known_code(target):
            return None
        return "ftrace caller calls outside known code"
    return "unknown patch site kind"
