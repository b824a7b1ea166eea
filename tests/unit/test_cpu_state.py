"""QEMU monitor register dumps parsed into vCPU state (pure logic; the lab test reads a
real one and flips a real CR0.WP in tests/integration/test_hooks.py)."""

from __future__ import annotations

import pytest

from vims.vmi.cpu import CR0_WP, CR4_SMEP, parse_info_registers

DUMP = """
CPU#0
RAX=000000000001ad40 RBX=0000000000000000 RCX=0000000000000000 RDX=4000000000000000
GDT=     fffffe0000001000 0000007f
IDT=     fffffe0000000000 00000fff
CR0=80050033 CR2=000000003147cd08 CR3=000000000261c000 CR4=00750ef0
EFER=0000000000000d01
CPU#1
IDT=     fffffe0000000000 00000fff
CR0=80040033 CR2=0000000000000000 CR3=000000000261c000 CR4=00650ef0
"""


def test_each_cpu_block_gives_its_control_registers() -> None:
    cpu0, cpu1 = parse_info_registers(DUMP)
    assert (cpu0.cpu, cpu0.cr0, cpu0.cr4, cpu0.idtr_base) == (
        0, 0x80050033, 0x750EF0, 0xFFFFFE0000000000)
    assert cpu0.cr0 & CR0_WP
    assert not cpu1.cr0 & CR0_WP
    assert cpu0.cr4 & CR4_SMEP
    assert not cpu1.cr4 & CR4_SMEP
    assert cpu0.lstar is None  # QEMU's monitor does not show MSR_LSTAR


@pytest.mark.parametrize("text", ["", "no cpus here", "CPU#0\nRAX=0\n", "CPU#0\nCR0=zz\n"])
def test_output_without_registers_is_one_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="QEMU monitor"):
        parse_info_registers(text)
