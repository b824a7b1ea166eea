"""Guest memory access for the A-VM: one interface, LibVMI underneath.

``GuestMemory`` reads a C-VM's kernel virtual memory. LibVMI does what it is
good at — finding the kernel, its KASLR slide and its page tables, translating
addresses (with its own caches) — in FILE mode for a RAM file or snapshot, and
in XEN or KVM mode for a live domain. When memory is a file, bulk reads skip
LibVMI's per-call cost: pages are translated once and sliced straight out of an
mmap of the file.

Guest memory is untrusted input: every read is bounded by the caller, a failed
translation or read raises ``MemoryReadError`` carrying the address, never a
crash; walkers turn that into an ``error`` status with a reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from vims.errors import VimsError
from vims.vmi.profile import Profile

if TYPE_CHECKING:
    from vims.vmi.cpu import VcpuState

PAGE = 4096
KERNEL_MAP = 0xFFFFFFFF80000000
MAX_READ = 64 << 20
ALL_DTBS = (1 << 64) - 1
PTE_PRESENT = 1
PTE_RW = 1 << 1
PTE_HUGE = 1 << 7
PTE_NX = 1 << 63
PTE_ADDR = 0x000F_FFFF_FFFF_F000  # bits 12-51: NX, protection keys and flags masked off


class GuestMemoryError(VimsError):
    """The guest's memory cannot be opened."""


class MemoryReadError(Exception):
    """A guest address could not be translated or read (guest data is untrusted)."""

    def __init__(self, address: int, size: int, why: str = "unmapped") -> None:
        super().__init__(f"cannot read {size} bytes at 0x{address:x}: {why}")
        self.address = address
        self.size = size


_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """LibVMI's init writes a stray NUL to C stdout: keep it out of JSON output."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        # The NUL may sit in C's stdout buffer (stdout a pipe): flush it to stderr now,
        # or it reaches stdout at exit, after the JSON.
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


class GuestMemory:
    """Kernel-virtual reads of a C-VM through LibVMI, with an mmap fast path for files.

    ``pauser`` is how ``paused()`` stops the guest for a consistent view: QMP
    stop/cont for the QEMU lab, LibVMI's pause on Xen; None when the memory is a
    snapshot that cannot change.
    """

    def __init__(self, profile: Profile, *, path: Path | None = None, domain: str | None = None,
                 mode: str = "file",
                 pauser: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
                 vcpus: Callable[[], list[VcpuState]] | None = None,
                 ) -> None:
        from libvmi import INIT_DOMAINNAME, Libvmi, LibvmiError, VMIConfig, VMIMode

        self.profile = profile
        self._libvmi_error = LibvmiError
        self._pauser = pauser
        self._vcpus = vcpus
        self._map: mmap.mmap | None = None
        self._path = path
        # The live domain read through a hypervisor driver (None for a memory file).
        self.domain: str | None = domain if path is None else None
        self.mode: str | None = mode if path is None else None
        self._file = None
        # Kept open for LibVMI's lifetime: it reads the map on symbol look-ups.
        self._sysmap = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="vims-sysmap-", suffix=".map")
        profile.write_system_map(Path(self._sysmap.name))
        config = profile.libvmi_config(self._sysmap.name)
        if path is not None:
            if not path.is_file():
                raise GuestMemoryError(f"memory file {path} does not exist")
            size = path.stat().st_size
            if size < 16 << 20 or size % PAGE:
                raise GuestMemoryError(f"memory file {path} is {size} bytes: not a RAM image "
                                   "(truncated snapshot?)")
            target, vmi_mode = str(path), VMIMode.FILE
        elif domain is not None:
            target = domain
            vmi_mode = {"xen": VMIMode.XEN, "kvm": VMIMode.KVM}.get(mode, VMIMode.XEN)
        else:
            raise GuestMemoryError("give a memory file or a domain name")
        start = time.perf_counter()
        try:
            with _stdout_to_stderr():
                self.vmi = Libvmi(target, INIT_DOMAINNAME, mode=vmi_mode,
                                  config_mode=VMIConfig.STRING, config=config)
        except LibvmiError as exc:
            raise GuestMemoryError(
                f"LibVMI could not initialise on {target} ({exc}): wrong profile for this "
                "kernel, or not a memory image of a Linux guest"
            ) from exc
        self.init_seconds = time.perf_counter() - start
        if path is not None:
            self._file = path.open("rb")
            self._map = mmap.mmap(self._file.fileno(), 0, prot=mmap.PROT_READ)
        elif self._pauser is None:
            # A live domain: the hypervisor driver pauses it (Xen: domain pause).
            self._pauser = self._vmi_paused
        stext = int(self.vmi.translate_ksym2v("_stext"))
        self.kaslr_offset: int = stext - profile.symbol("_stext")
        pgd = "init_top_pgt" if profile.has_symbol("init_top_pgt") else "swapper_pg_dir"
        self.kernel_dtb: int = self.kv2p(self.sym(pgd))  # the kernel's own page tables

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        # The Xen driver's teardown writes the same stray NUL to C stdout as init.
        with contextlib.suppress(Exception), _stdout_to_stderr():
            self.vmi.destroy()
        if self._map is not None:
            self._map.close()
        if self._file is not None:
            self._file.close()
        self._sysmap.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @contextlib.contextmanager
    def _vmi_paused(self) -> Iterator[None]:
        """Pause through LibVMI's driver; always resume, even when the read failed."""
        try:
            self.vmi.pause_vm()
        except self._libvmi_error as exc:
            raise GuestMemoryError(f"LibVMI could not pause the domain: {exc}") from exc
        try:
            yield
        finally:
            self.vmi.resume_vm()

    @property
    def can_pause(self) -> bool:
        return self._pauser is not None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the guest for a consistent view; caches are flushed on entry."""
        if self._pauser is None:
            yield
            return
        with self._pauser():
            self.flush()
            yield

    def flush(self) -> None:
        """Forget cached translations: the guest may have changed its page tables."""
        self.vmi.v2pcache_flush(ALL_DTBS)  # 0 would flush only a dtb-0 cache, i.e. nothing
        self.vmi.pagecache_flush()

    def vcpus(self) -> list[VcpuState] | None:
        """The vCPUs' control state from the hypervisor; None for a memory snapshot."""
        if self._vcpus is not None:
            return self._vcpus()
        if self.domain is None:
            return None
        from vims.vmi.cpu import libvmi_vcpus

        try:
            return libvmi_vcpus(self.vmi)
        except (self._libvmi_error, ValueError) as exc:
            raise GuestMemoryError(f"LibVMI could not read vCPU registers: {exc}") from exc

    # -------------------------------------------------------------- symbols
    def sym(self, name: str) -> int:
        """Runtime (KASLR-relocated) address of a kernel symbol."""
        return self.profile.symbol(name) + self.kaslr_offset

    # ---------------------------------------------------------- translation
    def kv2p(self, vaddr: int) -> int:
        try:
            return int(self.vmi.translate_kv2p(vaddr))
        except (self._libvmi_error, OverflowError) as exc:
            raise MemoryReadError(vaddr, 1) from exc

    def uv2p(self, vaddr: int, dtb: int) -> int:
        """Translate a user address through a process's page-table root (physical)."""
        try:
            paddr = self.vmi.pagetable_lookup(dtb, vaddr)
        except (self._libvmi_error, OverflowError) as exc:
            raise MemoryReadError(vaddr, 1, "user page not present") from exc
        return int(paddr)

    # ----------------------------------------------------------------- reads
    def read_pa(self, paddr: int, size: int) -> bytes:
        if self._map is not None:
            if paddr < 0 or paddr + size > len(self._map):
                raise MemoryReadError(paddr, size, "beyond the end of guest RAM")
            return self._map[paddr:paddr + size]
        try:
            data, got = self.vmi.read_pa(paddr, size)
        except (self._libvmi_error, OverflowError) as exc:
            raise MemoryReadError(paddr, size) from exc
        if got != size:
            raise MemoryReadError(paddr, size, f"short read ({got})")
        return bytes(data)

    def read(self, vaddr: int, size: int) -> bytes:
        """Read kernel virtual memory.

        Each step asks the kernel's page tables for the mapping and its page
        size, so a read crossing 2 MiB or 1 GiB pages (kernel text, the direct
        map) costs one translation per large page rather than one per 4 KiB.
        """
        if not 0 <= size <= MAX_READ:
            raise MemoryReadError(vaddr, size, "read too large")
        if vaddr < 0 or vaddr + size > 1 << 64:
            raise MemoryReadError(vaddr, size, "not a canonical address")
        if size <= PAGE - (vaddr & (PAGE - 1)):  # the common small read: one page
            return self.read_pa(self.kv2p(vaddr), size)
        buf = bytearray(size)
        self.read_into(vaddr, buf)
        return bytes(buf)

    def read_into(self, vaddr: int, buf: bytearray) -> None:
        """Fill ``buf`` from kernel virtual memory: one copy, for bulk reads (kernel text)."""
        pos, end = vaddr, vaddr + len(buf)
        while pos < end:
            paddr, page_size = self._lookup(pos)
            chunk = min(end, (pos | (page_size - 1)) + 1) - pos
            if self._map is not None:
                if paddr + chunk > len(self._map):
                    raise MemoryReadError(pos, chunk, "beyond the end of guest RAM")
                buf[pos - vaddr:pos - vaddr + chunk] = memoryview(self._map)[paddr:paddr + chunk]
            else:
                buf[pos - vaddr:pos - vaddr + chunk] = self.read_pa(paddr, chunk)
            pos += chunk

    def _lookup(self, vaddr: int) -> tuple[int, int]:
        """Physical address of ``vaddr`` and the size of the page that maps it."""
        try:
            info = self.vmi.pagetable_lookup_extended(self.kernel_dtb, vaddr)
        except (self._libvmi_error, OverflowError) as exc:
            raise MemoryReadError(vaddr, 1) from exc
        size = int(info.size)
        if size not in (PAGE, 2 << 20, 1 << 30):
            size = PAGE
        return int(info.paddr), size

    def read_user(self, vaddr: int, size: int, dtb: int) -> bytes:
        """Read a process's memory through its page tables (``dtb`` = physical PGD)."""
        if not 0 <= size <= MAX_READ:
            raise MemoryReadError(vaddr, size, "read too large")
        out = bytearray()
        pos, end = vaddr, vaddr + size
        while pos < end:
            chunk = min(end, (pos | (PAGE - 1)) + 1) - pos
            out += self.read_pa(self.uv2p(pos, dtb), chunk)
            pos += chunk
        return bytes(out)

    def user_pages(self, dtb: int, start: int, end: int) -> Iterator[tuple[int, int]]:
        """``(vaddr, paddr)`` of each resident 4 KiB page of ``[start, end)`` in a process
        (page-table root ``dtb``), large pages split into their 4 KiB parts."""
        for vaddr, size, paddr, _, _ in self._mappings(dtb, start, end):
            for offset in range(0, size, PAGE):
                yield vaddr + offset, paddr + offset

    def kernel_mappings(self, start: int, end: int) -> Iterator[tuple[int, int, bool, bool]]:
        """``(vaddr, size, writable, executable)`` of each present page mapping
        ``[start, end)`` in the kernel's page tables."""
        for vaddr, size, _, writable, executable in self._mappings(self.kernel_dtb, start, end):
            yield vaddr, size, writable, executable

    def _mappings(self, dtb: int, start: int, end: int,
                  ) -> Iterator[tuple[int, int, int, bool, bool]]:
        """``(vaddr, size, paddr, writable, executable)`` of each present mapping of
        ``[start, end)`` under the 4-level tables at ``dtb``: a 1 GiB or 2 MiB page as
        one mapping (from ``vaddr`` to its end or ``end``), else each 4 KiB page.
        Permissions are as the CPU applies them: writable only if RW is set at every
        level, executable only if NX is set at none.

        Walks the tables itself, reading a whole page-table page at a time: one read
        per 2 MiB of range instead of one LibVMI lookup per page (process.code's cost
        was mostly those lookups). Entries are guest data: addresses are masked to 52
        bits and reads are bounds-checked by ``read_pa``.
        """
        vaddr = start & ~(PAGE - 1)
        while vaddr < end:
            table, following, rw, nx = dtb & PTE_ADDR, 0, True, False
            for shift in (39, 30, 21):
                entry = _U64.unpack(self.read_pa(table + ((vaddr >> shift) & 511) * 8, 8))[0]
                span = 1 << shift
                rw, nx = rw and bool(entry & PTE_RW), nx or bool(entry & PTE_NX)
                if not entry & PTE_PRESENT:
                    following = (vaddr & ~(span - 1)) + span
                    break
                if shift < 39 and entry & PTE_HUGE:  # a 1 GiB or 2 MiB page
                    following = min(end, (vaddr & ~(span - 1)) + span)
                    base = entry & PTE_ADDR & ~(span - 1)
                    yield vaddr, following - vaddr, base + (vaddr & (span - 1)), rw, not nx
                    break
                table = entry & PTE_ADDR
            if not following:
                ptes = self.read_pa(table, PAGE)
                following = min(end, (vaddr & ~((2 << 20) - 1)) + (2 << 20))
                for v in range(vaddr, following, PAGE):
                    entry = _U64.unpack_from(ptes, ((v >> 12) & 511) * 8)[0]
                    if entry & PTE_PRESENT:
                        yield (v, PAGE, entry & PTE_ADDR, rw and bool(entry & PTE_RW),
                               not (nx or entry & PTE_NX))
            vaddr = following

    def u64(self, vaddr: int) -> int:
        value: int = _U64.unpack(self.read(vaddr, 8))[0]
        return value

    def u32(self, vaddr: int) -> int:
        value: int = _U32.unpack(self.read(vaddr, 4))[0]
        return value

    def i32(self, vaddr: int) -> int:
        value: int = _I32.unpack(self.read(vaddr, 4))[0]
        return value

    def cstr(self, vaddr: int, limit: int = 256) -> str:
        """A NUL-terminated string of at most ``limit`` bytes (guest-controlled)."""
        raw = self.read(vaddr, limit)
        return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")

    # -------------------------------------------------------------- writes
    def write_pa(self, paddr: int, data: bytes) -> None:
        """Write guest-physical memory: tests use it to play the rootkit from outside."""
        if self._path is not None:
            with self._path.open("r+b") as f:
                f.seek(paddr)
                f.write(data)
            return
        try:
            self.vmi.write_pa(paddr, data)
        except self._libvmi_error as exc:
            raise MemoryReadError(paddr, len(data), "write failed") from exc

    def write(self, vaddr: int, data: bytes) -> None:
        """Write kernel virtual memory, page by page."""
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, PAGE - ((vaddr + pos) & (PAGE - 1)))
            self.write_pa(self.kv2p(vaddr + pos), data[pos:pos + chunk])
            pos += chunk
