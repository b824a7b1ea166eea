"""OS profiles: what VIMS must know about one kernel build to read a C-VM's memory.

A profile is built from the kernel image the C-VM boots, and from nothing
else: the vmlinux inside the bzImage (:mod:`vims.vmi.kimage`) carries its type
layouts as BTF (:mod:`vims.vmi.btf`) and its symbols as kallsyms
(:mod:`vims.vmi.kallsyms`). No debug package, no running guest, no network.

The saved form is one flat JSON file (``"format": "vims-profile/2"``) that loads
in well under a second::

    release, banner, build_id, kernel_sha256, source_format
    phys_startup_64, nr_syscalls, nr_syscalls_source
    symbols       {name: unrelocated address}         (first of duplicate names)
    symbol_types  {name: nm letter}
    types         {struct/union name: {"kind", "size", "members": {path: MEMBER}}}
    enums         {enum name: {constant: value}}
    syscall_table [handler address per syscall, as linked]        (optional)
    text_layout   relocation and patch sites of the kernel text   (optional)

where MEMBER is ``[byte offset, bit offset, bit size, C type, struct]``: bit
offset counts from the start of the struct, bit size is 0 unless a bitfield,
and ``struct`` names the struct/union the member's type is (through typedefs),
so dotted paths such as ``module.core_layout.base`` resolve. Members of
anonymous structs/unions appear under their C names (``task_struct.pid`` works
however the kernel nests it); members of an anonymous type reached through a
named member appear dotted (``foo.bar``).

Addresses are as linked (before KASLR); the memory layer adds the slide.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection
from elftools.elf.segments import NoteSegment

from vims import __version__
from vims.vmi import kfacts
from vims.vmi.btf import COMPOSITE, MAX_DEPTH, Btf, Kind, parse_btf
from vims.vmi.errors import ProfileError
from vims.vmi.kallsyms import Kallsyms, parse_kallsyms
from vims.vmi.kimage import ExtractedKernel, read_kernel
from vims.vmi.ktext import TextLayout

__all__ = [
    "FORMAT",
    "START_KERNEL_MAP",
    "KernelAnalysis",
    "MemberInfo",
    "Profile",
    "ProfileError",
    "analyze_kernel",
    "build_profile",
]

FORMAT = "vims-profile/2"
#: Base of the kernel text mapping on x86_64; ``__pa_symbol(x) = x - START_KERNEL_MAP``.
START_KERNEL_MAP = 0xFFFFFFFF80000000
#: Symbols without which LibVMI and the checks cannot work: a build missing one is refused.
REQUIRED_SYMBOLS = ("startup_64", "_stext", "_etext", "init_task", "sys_call_table")
_BANNER_MAX = 1024
_BANNER = re.compile(rb"(Linux version \d[^\0\n]{0,1000}\n?)\0")

Progress = Callable[[str], AbstractContextManager[Any]]


def _no_progress(_what: str) -> AbstractContextManager[None]:
    return nullcontext()


@dataclass(frozen=True)
class MemberInfo:
    """Where a member lives: byte offset (of its first bit), bit offset, bit size, C type."""

    offset: int
    bit_offset: int
    bit_size: int
    type: str


class _LoadedImage:
    """Read a vmlinux at link-time virtual addresses through its PT_LOAD segments."""

    def __init__(self, elf: ELFFile, data: bytes) -> None:
        self._data = data
        self._segments = [(seg["p_vaddr"], seg["p_filesz"], seg["p_offset"])
                          for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]

    def read(self, vaddr: int, size: int) -> bytes:
        for start, length, offset in self._segments:
            if start <= vaddr and vaddr + size <= start + length:
                pos = offset + vaddr - start
                return self._data[pos:pos + size]
        raise ProfileError(f"0x{vaddr:x}+{size} is not inside the vmlinux image")

    def read_string(self, vaddr: int, limit: int) -> bytes:
        for start, length, offset in self._segments:
            if start <= vaddr < start + length:
                pos = offset + vaddr - start
                end = self._data.find(b"\0", pos, min(pos + limit, offset + length))
                if end < 0:
                    raise ProfileError(f"string at 0x{vaddr:x} unterminated within {limit} bytes")
                return self._data[pos:end]
        raise ProfileError(f"0x{vaddr:x} is not inside the vmlinux image")


@dataclass
class KernelAnalysis:
    """Everything read from one kernel image; both the profile and the ISF are built from it."""

    kernel_path: Path
    kernel_sha256: str
    extracted: ExtractedKernel
    btf: Btf
    kallsyms: Kallsyms
    symbols: dict[str, int]
    banner: str
    release: str
    build_id: str
    nr_syscalls: int
    nr_syscalls_source: str
    image: _LoadedImage = field(repr=False)


def analyze_kernel(kernel_path: Path, progress: Progress = _no_progress) -> KernelAnalysis:
    """Extract and parse a bzImage (or vmlinux): BTF, kallsyms, banner, build-id."""
    with progress(f"extracting vmlinux from {kernel_path}"):
        extracted = read_kernel(kernel_path)
        kernel_sha256 = hashlib.sha256(kernel_path.read_bytes()).hexdigest()
    vmlinux = extracted.vmlinux
    try:
        elf = ELFFile(io.BytesIO(vmlinux))
        btf_section = elf.get_section_by_name(".BTF")
        btf_blob = btf_section.data() if btf_section is not None else None
        build_id = _build_id(elf)
        text_base = _text_base(elf)
        image = _LoadedImage(elf, vmlinux)
    except ProfileError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyelftools raises assorted errors on bad input
        raise ProfileError(f"{kernel_path}: vmlinux ELF unreadable: {exc!r}") from None
    if btf_blob is None:
        raise ProfileError(f"{kernel_path}: vmlinux has no .BTF section "
                           "(kernel built without CONFIG_DEBUG_INFO_BTF)")
    with progress(f"parsing BTF ({len(btf_blob) >> 10} KiB)"):
        btf = parse_btf(btf_blob, pointer_size=8)
    with progress("decoding kallsyms"):
        kallsyms = parse_kallsyms(vmlinux, text_base)
        symbols = kallsyms.by_name()
    missing = [name for name in REQUIRED_SYMBOLS if name not in symbols]
    if missing:
        raise ProfileError(f"{kernel_path}: kallsyms lacks {', '.join(missing)}")
    banner = _banner(image, symbols, vmlinux)
    release = banner.split()[2]
    nr, source = _nr_syscalls(btf, kallsyms, symbols)
    return KernelAnalysis(kernel_path=kernel_path, kernel_sha256=kernel_sha256,
                          extracted=extracted, btf=btf, kallsyms=kallsyms, symbols=symbols,
                          banner=banner, release=release, build_id=build_id, nr_syscalls=nr,
                          nr_syscalls_source=source, image=image)


def _build_id(elf: ELFFile) -> str:
    holders: list[NoteSection | NoteSegment] = [
        s for s in elf.iter_sections() if isinstance(s, NoteSection)]
    if not holders:  # section headers stripped: fall back to the PT_NOTE segments
        holders = [s for s in elf.iter_segments() if isinstance(s, NoteSegment)]
    for holder in holders:
        for note in holder.iter_notes():
            if note["n_name"] == "GNU" and note["n_type"] == "NT_GNU_BUILD_ID":
                return str(note["n_desc"])
    raise ProfileError("vmlinux has no GNU build-id note")


def _text_base(elf: ELFFile) -> int:
    text = elf.get_section_by_name(".text")
    if text is not None and text["sh_addr"]:
        return int(text["sh_addr"])
    starts = [seg["p_vaddr"] for seg in elf.iter_segments()
              if seg["p_type"] == "PT_LOAD" and seg["p_flags"] & 1]
    if not starts:
        raise ProfileError("vmlinux has neither a .text section nor an executable segment")
    return int(min(starts))


def _banner(image: _LoadedImage, symbols: dict[str, int], vmlinux: bytes) -> str:
    """``linux_banner`` as the kernel prints it (one line, trailing newline stripped).

    Read at the symbol; without it, a ``Linux version <digit>...`` string of the
    image, preferring one with a build number (``#1``): 6.1 also keeps a copy
    without it from ``init/version.c``.
    """
    if "linux_banner" in symbols:
        raw = image.read_string(symbols["linux_banner"], _BANNER_MAX)
    else:
        found = [m.group(1) for m in _BANNER.finditer(vmlinux)]
        numbered = [b for b in found if re.search(rb" #\d", b)]
        raw = (numbered or found or [b""])[0]
    if not raw.startswith(b"Linux version "):
        raise ProfileError("linux_banner does not hold a 'Linux version ...' string")
    text = raw.decode("utf-8", "replace").rstrip("\n")
    if len(text.split()) < 3 or "\n" in text:
        raise ProfileError(f"malformed linux_banner: {text[:80]!r}")
    return text


def _nr_syscalls(btf: Btf, kallsyms: Kallsyms, symbols: dict[str, int]) -> tuple[int, str]:
    """Number of x86_64 system calls (``__NR_syscalls``).

    Preferred: BTF, where ``struct trace_array`` (with CONFIG_FTRACE_SYSCALLS)
    has ``enter_syscall_files[NR_syscalls]``, an exact compile-time count.
    Fallback: the gap from ``sys_call_table`` to the next symbol / 8, an upper
    bound because the linker pads it (DESIGN.md: 6.1's gap is larger than 451).
    """
    trace_array = btf.find_composite("trace_array")
    if trace_array is not None:
        member = btf.flat_members(trace_array.type_id).get("enter_syscall_files")
        if member is not None:
            array = btf.resolve(member.type_id)
            if array.kind is Kind.ARRAY and array.nelems:
                return array.nelems, "btf:trace_array.enter_syscall_files"
    table = symbols["sys_call_table"]
    following = [a for a in kallsyms.addresses if a > table]
    if not following:
        raise ProfileError("cannot size sys_call_table: no symbol follows it")
    return (min(following) - table) // 8, "kallsyms:gap-after-sys_call_table (upper bound)"


def _member_table(btf: Btf, type_id: int) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, m in btf.flat_members(type_id).items():
        target = btf.resolve(m.type_id)
        ref = target.name if target.kind in COMPOSITE else ""
        out[name] = [m.bit_offset // 8, m.bit_offset, m.bit_size, btf.type_name(m.type_id), ref]
    return out


def _kernel_facts(analysis: KernelAnalysis) -> dict[str, Any]:
    """sys_call_table contents and the kernel text layout, for the integrity checks.

    They come from :mod:`vims.vmi.kfacts` (the vendor image's link-time tables).
    """
    reader = kfacts.ImageReader(analysis.extracted.vmlinux)
    return {
        "syscall_table": kfacts.syscall_table(reader, analysis.symbols, analysis.nr_syscalls),
        "text_layout": kfacts.text_layout(reader, analysis.symbols,
                                          analysis.extracted.relocs).to_json(),
    }


def _name_rank(name: str) -> tuple[bool, str]:
    marker = name.startswith(("__start", "__stop", "__end")) or name.endswith(
        ("_start", "_end", "_begin"))
    return (not marker, name)  # the greatest wins, as sorting by (address, name) did


class Profile:
    """One kernel build's symbols and type layouts; see the module docstring for the format."""

    def __init__(self, data: dict[str, Any]) -> None:
        if data.get("format") != FORMAT:
            raise ProfileError(f"not a VIMS profile: format {data.get('format')!r}, "
                               f"expected {FORMAT!r}")
        try:
            self.release: str = str(data["release"])
            self.banner: str = str(data["banner"])
            self.build_id: str = str(data["build_id"])
            self.nr_syscalls: int = int(data["nr_syscalls"])
            self.symbols: dict[str, int] = data["symbols"]
            self._types: dict[str, dict[str, Any]] = data["types"]
            self._enums: dict[str, dict[str, int]] = data["enums"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"profile is incomplete or malformed: {exc}") from None
        self._data = data
        self._by_address: list[tuple[int, str]] | None = None

    # -- persistence -------------------------------------------------------------------------

    @classmethod
    def from_analysis(cls, analysis: KernelAnalysis, *, with_facts: bool = True) -> Profile:
        btf = analysis.btf
        types: dict[str, dict[str, Any]] = {}
        for name in btf.composite_names():
            t = btf.composite(name)
            types[name] = {"kind": "struct" if t.kind is Kind.STRUCT else "union",
                           "size": t.size, "members": _member_table(btf, t.type_id)}
        enums = {name: btf.enum_values(name) for name in btf.enum_names()}
        data: dict[str, Any] = {
            "format": FORMAT,
            "producer": f"vims {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "release": analysis.release,
            "banner": analysis.banner,
            "build_id": analysis.build_id,
            "kernel_sha256": analysis.kernel_sha256,
            "source_format": analysis.extracted.source_format,
            "phys_startup_64": analysis.symbols["startup_64"] - START_KERNEL_MAP,
            "nr_syscalls": analysis.nr_syscalls,
            "nr_syscalls_source": analysis.nr_syscalls_source,
            "symbols": analysis.symbols,
            "symbol_types": analysis.kallsyms.types_by_name(),
            "types": types,
            "enums": enums,
        }
        if with_facts:
            data.update(_kernel_facts(analysis))
        return cls(data)

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename), so a reader never sees half a profile."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._data, f, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            with path.open("rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ProfileError(f"{path}: no such profile") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{path}: not a readable JSON profile: {exc}") from None
        if not isinstance(data, dict):
            raise ProfileError(f"{path}: not a VIMS profile (JSON {type(data).__name__})")
        try:
            return cls(data)
        except ProfileError as exc:
            raise ProfileError(f"{path}: {exc}") from None

    # -- kernel identity ---------------------------------------------------------------------

    @property
    def kernel_sha256(self) -> str:
        return str(self._data.get("kernel_sha256", ""))

    @property
    def phys_startup_64(self) -> int:
        return int(self._data["phys_startup_64"])

    def check_matches(self, build_id: str, release: str) -> None:
        """Refuse memory of another kernel (build-id compared when the memory gives one)."""
        same_id = not build_id or build_id.lower() == self.build_id.lower()
        if not same_id or release != self.release:
            raise ProfileError(f"profile is for kernel {self.release} (build-id {self.build_id}), "
                               f"the memory runs {release} (build-id {build_id or 'unknown'})")

    # -- symbols -----------------------------------------------------------------------------

    def symbol(self, name: str) -> int:
        """Unrelocated address of ``name``; per-CPU symbols give their per-CPU offset."""
        try:
            return self.symbols[name]
        except KeyError:
            raise ProfileError(f"kernel {self.release} has no symbol '{name}'") from None

    def has_symbol(self, name: str) -> bool:
        return name in self.symbols

    def symbol_type(self, name: str) -> str:
        """The nm letter of a symbol (``T`` text, ``D`` data, ``A`` absolute/per-CPU, ...)."""
        self.symbol(name)
        return str(self._data.get("symbol_types", {}).get(name, "?"))

    def symbolize(self, address: int) -> str:
        """``name+0xoff`` for an unrelocated kernel address, else the address in hex."""
        if self._by_address is None:
            # One name per address: a function's own name before a linker marker
            # (``__static_call_text_start``) that happens to share its address.
            best: dict[int, str] = {}
            for n, a in self.symbols.items():
                if a >= START_KERNEL_MAP and (a not in best or _name_rank(n) > _name_rank(best[a])):
                    best[a] = n
            self._by_address = sorted(best.items())
        table = self._by_address
        i = bisect.bisect_right(table, (address, "\U0010ffff")) - 1
        end = self.symbols.get("_end", table[-1][0] if table else 0)
        if i < 0 or address >= end:
            return f"0x{address:x}"
        base, name = table[i]
        return name if address == base else f"{name}+0x{address - base:x}"

    def write_system_map(self, path: Path) -> None:
        """A System.map for LibVMI (``addr type name``, by address), with ``phys_startup_64``."""
        letters: dict[str, str] = self._data.get("symbol_types", {})
        rows = sorted((addr, name) for name, addr in self.symbols.items())
        rows.append((self.phys_startup_64, "phys_startup_64"))
        rows.sort()
        lines = [f"{addr:016x} {letters.get(name, 'A' if name == 'phys_startup_64' else 'T')} "
                 f"{name}\n" for addr, name in rows]
        path.write_text("".join(lines), encoding="ascii", errors="replace")

    def libvmi_config(self, sysmap_path: str | Path) -> str:
        """LibVMI's config string (STRING mode) with the offsets its Linux OS driver needs."""
        sysmap = str(sysmap_path)
        if '"' in sysmap or "\n" in sysmap:
            raise ProfileError(f"System.map path unusable in a LibVMI config: {sysmap!r}")
        return ("{ "
                f'ostype = "Linux"; sysmap = "{sysmap}"; '
                f"linux_tasks = 0x{self.offset('task_struct', 'tasks'):x}; "
                f"linux_mm = 0x{self.offset('task_struct', 'mm'):x}; "
                f"linux_pid = 0x{self.offset('task_struct', 'pid'):x}; "
                f"linux_name = 0x{self.offset('task_struct', 'comm'):x}; "
                f"linux_pgd = 0x{self.offset('mm_struct', 'pgd'):x}; "
                "}")

    # -- types -------------------------------------------------------------------------------

    def struct_names(self) -> list[str]:
        return list(self._types)

    def has_struct(self, struct: str) -> bool:
        return struct in self._types

    def _struct(self, struct: str) -> dict[str, Any]:
        try:
            return self._types[struct]
        except KeyError:
            raise ProfileError(f"kernel {self.release} has no struct or union '{struct}'") from None

    def size(self, struct: str) -> int:
        return int(self._struct(struct)["size"])

    def members(self, struct: str) -> list[str]:
        """The direct members of ``struct`` (nested paths left out)."""
        return [m for m in self._struct(struct)["members"] if "." not in m]

    def member(self, struct: str, member_path: str) -> MemberInfo:
        """Locate ``member_path`` (``pid``, ``core_layout.base``) from the start of ``struct``."""
        try:
            return self._member(struct, member_path)
        except (IndexError, KeyError, TypeError, AttributeError) as exc:
            raise ProfileError(f"profile malformed at struct {struct}: {exc!r}") from None

    def _member(self, struct: str, member_path: str) -> MemberInfo:
        layout = self._struct(struct)
        base = 0
        path = member_path
        for _ in range(MAX_DEPTH):
            members: dict[str, list[Any]] = layout["members"]
            hit = members.get(path)
            if hit is not None:
                return MemberInfo(offset=base + hit[0], bit_offset=8 * base + hit[1],
                                  bit_size=hit[2], type=hit[3])
            parts = path.split(".")
            for cut in range(len(parts) - 1, 0, -1):
                outer = members.get(".".join(parts[:cut]))
                if outer is not None and outer[4] in self._types and not outer[2]:
                    layout, base, path = self._types[outer[4]], base + outer[0], \
                        ".".join(parts[cut:])
                    break
            else:
                break
        raise ProfileError(f"struct {struct} of kernel {self.release} has no member "
                           f"'{member_path}'")

    def offset(self, struct: str, member_path: str) -> int:
        """Byte offset of a member (dotted paths descend into nested structs)."""
        return self.member(struct, member_path).offset

    def has_member(self, struct: str, member: str) -> bool:
        try:
            self.member(struct, member)
        except ProfileError:
            return False
        return True

    def member_type(self, struct: str, member: str) -> str:
        return self.member(struct, member).type

    def enum(self, name: str) -> dict[str, int]:
        try:
            return dict(self._enums[name])
        except KeyError:
            raise ProfileError(f"kernel {self.release} has no enum '{name}'") from None

    # -- kernel facts for the integrity checks -----------------------------------------------

    @property
    def syscall_table(self) -> list[int]:
        """Handler of each syscall as linked (empty if the profile was built without facts)."""
        return list(self._data.get("syscall_table", []))

    @functools.cached_property
    def text_layout(self) -> TextLayout:
        raw = self._data.get("text_layout")
        if not isinstance(raw, dict):
            raise ProfileError("the profile has no kernel text layout (rebuild the profile)")
        try:
            return TextLayout.from_json(raw)
        except ValueError as exc:
            raise ProfileError(str(exc)) from None


def build_profile(kernel_path: Path, progress: Progress = _no_progress) -> Profile:
    """Build the profile of a bzImage or vmlinux (a few seconds; no debug package)."""
    analysis = analyze_kernel(kernel_path, progress)
    with progress("laying out types and kernel facts"):
        return Profile.from_analysis(analysis)

