"""Known-good baselines: executables' text pages from a golden image, and the
clean guest's kernel state (IDT, module sizes, normalized kernel text pages).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from vims.errors import VimsError
from vims.vmi.linux import Linux, idt_gates, idt_handlers
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

BASELINE_FORMAT = "vims-baseline/1"
PAGE = 4096
MAX_ARCHIVE = 1 << 30
MAX_ENTRIES = 200_000


class BaselineError(VimsError):
    """A baseline cannot be built or loaded."""


def _decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:6] == b"\xfd7zXZ\0":
        return lzma.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_ARCHIVE)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    return data


def cpio_files(archive: bytes) -> Iterator[tuple[str, bytes]]:
    """Regular files of a newc cpio archive (what the kernel unpacks).

    Hand-written because nothing in the standard library reads cpio and
    extracting an untrusted archive to disk is riskier than reading it.
    """
    pos, count = 0, 0
    while pos + 110 <= len(archive):
        head = archive[pos:pos + 110]
        if head[:6] not in (b"070701", b"070702"):
            raise BaselineError(f"not a newc cpio archive (bad magic at offset {pos})")
        try:
            fields = [int(head[6 + i * 8:14 + i * 8], 16) for i in range(13)]
        except ValueError as exc:
            raise BaselineError(f"corrupt cpio header at offset {pos}") from exc
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = archive[pos + 110:name_end - 1].decode(errors="replace")
        data_start = (name_end + 3) & ~3
        data_end = data_start + filesize
        if data_end > len(archive):
            raise BaselineError(f"cpio entry {name} is truncated")
        if name == "TRAILER!!!":
            return
        count += 1
        if count > MAX_ENTRIES:
            raise BaselineError("cpio archive has too many entries")
        if stat.S_ISREG(mode):
            yield "/" + name.lstrip("./").lstrip("/"), archive[data_start:data_end]
        pos = (data_end + 3) & ~3


def rootfs_files(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield "/" + str(path.relative_to(root)), path.read_bytes()


def elf_text(data: bytes) -> dict[str, Any] | None:
    """Text range and per-page digests of an ELF executable, as the loader maps it.

    ``text_start``/``text_end`` follow binfmt_elf's start_code/end_code: the
    lowest p_vaddr and highest p_vaddr + p_filesz of executable PT_LOADs, before
    the load bias; pages are keyed by page-aligned unbiased address.
    """
    if data[:4] != b"\x7fELF":
        return None
    try:
        elf = ELFFile(io.BytesIO(data))
        segs = [s for s in elf.iter_segments()
                if s["p_type"] == "PT_LOAD" and s["p_flags"] & 1]
    except (ELFError, ValueError, KeyError, IndexError):
        return None
    if not segs or elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
        return None
    start = min(s["p_vaddr"] for s in segs)
    end = max(s["p_vaddr"] + s["p_filesz"] for s in segs)
    pages: dict[str, str] = {}
    for seg in segs:
        first = seg["p_vaddr"] & ~(PAGE - 1)
        for vpage in range(first, seg["p_vaddr"] + seg["p_filesz"], PAGE):
            off = seg["p_offset"] - (seg["p_vaddr"] - vpage)
            if off < 0:
                continue
            chunk = data[off:off + PAGE].ljust(PAGE, b"\0")
            pages[str(vpage)] = hashlib.sha256(chunk).hexdigest()[:32]
    return {"text_start": start, "text_end": end, "type": elf["e_type"],
            "sha256": hashlib.sha256(data).hexdigest(), "pages": pages}


def executables(files: Iterator[tuple[str, bytes]]) -> dict[str, Any]:
    out = {}
    for path, data in files:
        entry = elf_text(data)
        if entry is not None:
            out[path] = entry
    return out


def load_image_files(initramfs: Path | None, rootfs: Path | None) -> dict[str, Any]:
    if initramfs is not None:
        if not initramfs.is_file():
            raise BaselineError(f"initramfs {initramfs} does not exist")
        raw = initramfs.read_bytes()
        try:
            archive = _decompress(raw)
        except (OSError, lzma.LZMAError, EOFError, ValueError) as exc:
            raise BaselineError(f"cannot decompress {initramfs}: {exc}") from exc
        return executables(cpio_files(archive))
    if rootfs is not None:
        if not rootfs.is_dir():
            raise BaselineError(f"rootfs {rootfs} is not a directory")
        return executables(rootfs_files(rootfs))
    return {}


def new_baseline(profile: Profile) -> dict[str, Any]:
    """An empty baseline bound to the profile's kernel."""
    return {"format": BASELINE_FORMAT,
            "kernel": {"release": profile.release, "build_id": profile.build_id}}


def clean_guest_state(mem: GuestMemory) -> dict[str, Any]:
    """What a clean, running guest contributes: IDT handlers and kernel text with the
    KASLR slide removed, module sizes, the usermode-helper paths, how many LSM
    hooks it has and the eBPF programs it runs. The caller keeps the guest paused."""
    from vims.vmi.bpf import loaded_programs
    from vims.vmi.kdata import helper_strings, lsm_hooks
    from vims.vmi.ktext import encode_text, normalized_text  # zstandard only when needed

    slide = mem.kaslr_offset
    return {
        "idt": [a - slide if a else 0 for a in idt_handlers(mem)],
        "idt_gates": [[selector, bits] for _, selector, bits in idt_gates(mem)],
        "modules": {m.name: {"size": m.size} for m in Linux(mem).modules()},
        "kernel_text": encode_text(normalized_text(mem)),
        "kernel_data": {"strings": helper_strings(mem), "lsm_hooks": len(lsm_hooks(mem))},
        "bpf": [{"name": p.name, "tag": p.tag, "type": p.type} for p in loaded_programs(mem)],
        **_cpu_protections(mem),
    }


def _cpu_protections(mem: GuestMemory) -> dict[str, Any]:
    """The CR4 protections the clean guest's vCPUs run with (when the hypervisor says)."""
    from vims.vmi.cpu import CR4_PROTECTIONS
    from vims.vmi.linux import xen_guest_type

    if xen_guest_type(mem) == "pv":
        return {}  # Xen owns a PV domain's control registers: cpu.state does not apply
    vcpus = mem.vcpus()
    if not vcpus:
        return {}
    return {"cpu": {"cr4": {name: all(v.cr4 & bit for v in vcpus)
                            for name, bit in CR4_PROTECTIONS.items()}}}


def save(baseline: dict[str, Any], out: Path) -> None:
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
    tmp.replace(out)


def load(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BaselineError(f"baseline {path} does not exist") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BaselineError(f"baseline {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise BaselineError(f"{path} is not a {BASELINE_FORMAT} file")
    return data
