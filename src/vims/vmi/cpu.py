"""vCPU control state: what the CPU, not memory, says the kernel runs with.

A rootkit that clears CR0.WP can write read-only kernel memory; one that
clears CR4.SMEP/SMAP can run or read user pages from the kernel; one that
re-points MSR_LSTAR or the IDTR takes every system call or interrupt without
touching a byte the memory checks read. The A-VM reads these from the
hypervisor: LibVMI's vCPU registers on Xen/KVM, QEMU's monitor
(``info registers -a``) in the QEMU lab, where MSR_LSTAR is not readable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CR0_WP = 1 << 16
CR4_UMIP = 1 << 11
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PROTECTIONS = {"umip": CR4_UMIP, "smep": CR4_SMEP, "smap": CR4_SMAP}
MAX_VCPUS = 1024
# libvmi.h register ids the Python binding's X86Reg enum does not carry.
LIBVMI_MSR_LSTAR = 71


@dataclass(frozen=True)
class VcpuState:
    cpu: int
    cr0: int
    cr4: int
    idtr_base: int | None  # None where the hypervisor interface does not give it
    lstar: int | None


_CPU = re.compile(r"^CPU#(\d+)", re.M)
_REG = re.compile(r"\b(CR0|CR4|EFER)=([0-9a-fA-F]+)")
_IDT = re.compile(r"^IDT=\s*([0-9a-fA-F]+)\s", re.M)


def parse_info_registers(text: str) -> list[VcpuState]:
    """QEMU's ``info registers -a`` output, one state per ``CPU#n`` block."""
    starts = [(m.start(), int(m.group(1))) for m in _CPU.finditer(text)][:MAX_VCPUS]
    out = []
    for i, (start, cpu) in enumerate(starts):
        block = text[start:starts[i + 1][0] if i + 1 < len(starts) else len(text)]
        regs = {k: int(v, 16) for k, v in _REG.findall(block)}
        idt = _IDT.search(block)
        if "CR0" not in regs or "CR4" not in regs:
            raise ValueError(f"QEMU monitor gave no CR0/CR4 for CPU#{cpu}")
        out.append(VcpuState(cpu, regs["CR0"], regs["CR4"],
                             int(idt.group(1), 16) if idt else None, None))
    if not out:
        raise ValueError("QEMU monitor output holds no CPU register block")
    return out


def libvmi_vcpus(vmi: object) -> list[VcpuState]:
    """vCPU state of a live domain through LibVMI (Xen, KVM)."""
    from libvmi import X86Reg

    n = int(vmi.get_num_vcpus())  # type: ignore[attr-defined]
    get = vmi.get_vcpureg  # type: ignore[attr-defined]
    out = []
    for cpu in range(min(n, MAX_VCPUS)):
        try:
            lstar: int | None = int(get(LIBVMI_MSR_LSTAR, cpu))
        except Exception:  # noqa: BLE001 - not every driver/guest type exposes the MSR
            lstar = None
        out.append(VcpuState(cpu, int(get(X86Reg.CR0.value, cpu)),
                             int(get(X86Reg.CR4.value, cpu)), None, lstar))
    return out
