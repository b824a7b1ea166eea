"""The XArray walk under kernel.bpf (prog_idr, link_idr) on crafted memory: what it
finds, and that a hostile tree ends in a WalkError, never a hang or a crash."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vims.vmi.bpf import XA_CHUNK_SIZE, xa_entries
from vims.vmi.linux import WalkError
from vims.vmi.memory import MemoryReadError

XA = 0xFFFF_8880_0000_1000  # struct xarray; xa_head at +8
SHIFT_OFF, SLOTS_OFF = 0, 40  # xa_node.shift, xa_node.slots as in 6.1 and 6.12
NODE_SIZE = SLOTS_OFF + 8 * XA_CHUNK_SIZE


class Profile:
    def offset(self, struct_name: str, member: str) -> int:
        return {("xarray", "xa_head"): 8, ("xa_node", "shift"): SHIFT_OFF,
                ("xa_node", "slots"): SLOTS_OFF}[(struct_name, member)]


class Memory:
    """Guest memory as a dict of byte strings at kernel addresses."""

    def __init__(self) -> None:
        self.profile = Profile()
        self.blocks: dict[int, bytes] = {}

    def read(self, addr: int, size: int) -> bytes:
        for base, data in self.blocks.items():
            if base <= addr and addr + size <= base + len(data):
                return data[addr - base:addr - base + size]
        raise MemoryReadError(addr, size)

    def u64(self, addr: int) -> int:
        value: int = struct.unpack("<Q", self.read(addr, 8))[0]
        return value

    def node(self, addr: int, shift: int, slots: dict[int, int]) -> int:
        raw = bytearray(NODE_SIZE)
        raw[SHIFT_OFF] = shift
        for i, v in slots.items():
            struct.pack_into("<Q", raw, SLOTS_OFF + 8 * i, v)
        self.blocks[addr] = bytes(raw)
        return addr | 2  # an internal (node) entry

    def head(self, entry: int) -> None:
        self.blocks[XA] = struct.pack("<QQ", 0, entry)


def walk(mem: Any) -> list[tuple[int, int]]:
    return list(xa_entries(mem, XA))


PROG = 0xFFFF_8880_0100_0000


def test_a_single_entry_sits_in_the_head() -> None:
    mem = Memory()
    mem.head(PROG)
    assert walk(mem) == [(0, PROG)]


def test_a_two_level_tree_gives_indexes() -> None:
    mem = Memory()
    leaf = mem.node(0xFFFF_8880_0000_4000, 0, {3: PROG, 4: 0x12 | 2, 5: PROG + 64})
    mem.head(mem.node(0xFFFF_8880_0000_3000, 6, {1: leaf}))
    # 4 holds a sibling entry (internal, small): no object behind it.
    assert walk(mem) == [(67, PROG), (69, PROG + 64)]


@pytest.mark.parametrize("case", ["self", "leaf-to-root", "user-space node", "shift"])
def test_a_crafted_tree_is_a_walk_error(case: str) -> None:
    mem = Memory()
    root_at, leaf_at = 0xFFFF_8880_0000_3000, 0xFFFF_8880_0000_4000
    if case == "self":
        mem.head(mem.node(root_at, 6, {0: root_at | 2}))
    elif case == "leaf-to-root":
        leaf = mem.node(leaf_at, 0, {0: root_at | 2})
        mem.head(mem.node(root_at, 6, {0: leaf}))
    elif case == "user-space node":
        mem.head(0x7FFF_0000_0002)
    else:
        mem.head(mem.node(root_at, 5, {0: PROG}))
    with pytest.raises(WalkError):
        walk(mem)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=NODE_SIZE, max_size=NODE_SIZE))
def test_random_nodes_end_in_entries_or_an_error(raw: bytes) -> None:
    mem = Memory()
    at = 0xFFFF_8880_0000_3000
    mem.blocks[at] = raw
    mem.head(at | 2)
    try:
        entries = walk(mem)
    except (WalkError, MemoryReadError):
        return
    assert len(entries) <= XA_CHUNK_SIZE
