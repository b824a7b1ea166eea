"""Registered kprobes and kretprobes, read from ``kprobe_table``.

A kprobe runs its ``pre_handler``/``post_handler`` whenever the probed
instruction executes; rootkits use them to watch or rewrite system calls
without touching the syscall table. Probes sharing an address hang off one
*aggregate* probe (``pre_handler == aggr_pre_handler``) on its ``list``; a
kretprobe is a ``struct kretprobe`` around its kprobe (``pre_handler ==
pre_handler_kretprobe``) whose ``handler``/``entry_handler`` run on return/entry.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from vims.vmi.linux import Struct, WalkError, is_kernel_pointer, list_for_each
from vims.vmi.memory import GuestMemory

KPROBE_TABLE_SIZE = 64  # 1 << KPROBE_HASH_BITS, unchanged since 2.6
MAX_PER_BUCKET = 4096
MAX_AGGREGATED = 1024
KPROBE_FLAG_GONE = 1
KPROBE_FLAG_DISABLED = 2
KPROBE_FLAG_OPTIMIZED = 4
KPROBE_FLAG_FTRACE = 8


@dataclass(frozen=True)
class Kprobe:
    address: int  # the struct kprobe
    addr: int  # the probed instruction
    flags: int
    handlers: tuple[tuple[str, int], ...]  # (role, function) of each non-NULL handler
    kretprobe: bool
    detour: int = 0  # an optimized probe's detour buffer, where its jmp must go


def registered_kprobes(mem: GuestMemory) -> list[Kprobe]:
    """Every probe in ``kprobe_table``, aggregates expanded to their member probes."""
    p = mem.profile
    if not p.has_symbol("kprobe_table"):
        return []
    aggr = mem.sym("aggr_pre_handler") if p.has_symbol("aggr_pre_handler") else -1
    kret = mem.sym("pre_handler_kretprobe") if p.has_symbol("pre_handler_kretprobe") else -1
    ret_off = {m: p.offset("kretprobe", m) for m in ("handler", "entry_handler")
               if p.has_struct("kretprobe") and p.has_member("kretprobe", m)}
    list_off = p.offset("kprobe", "list")
    heads = struct.unpack(f"<{KPROBE_TABLE_SIZE}Q",
                          mem.read(mem.sym("kprobe_table"), 8 * KPROBE_TABLE_SIZE))

    def probe(kp: int) -> Kprobe:
        k = Struct(mem, "kprobe", kp)
        addr, flags, pre, post = k.ptr("addr"), k.u32("flags"), k.ptr("pre_handler"), k.ptr(
            "post_handler")
        handlers = [("pre_handler", pre), ("post_handler", post)]
        is_ret = pre == kret
        if is_ret:  # the kprobe is the first member of its struct kretprobe
            handlers = [(role, mem.u64(kp + off)) for role, off in ret_off.items()]
        return Kprobe(kp, addr, flags, tuple((r, f) for r, f in handlers if f), is_ret)

    if p.offset("kprobe", "hlist"):
        raise WalkError("struct kprobe does not start with its hlist_node")
    out: list[Kprobe] = []
    for head in heads:
        node, seen = head, 0
        while node:
            if not is_kernel_pointer(node):
                raise WalkError("kprobe_table chain corrupt", node)
            seen += 1
            if seen > MAX_PER_BUCKET:
                raise WalkError(f"kprobe_table bucket longer than {MAX_PER_BUCKET}", node)
            k = Struct(mem, "kprobe", node)
            nxt, addr, flags, pre = k.ptr("hlist"), k.ptr("addr"), k.u32("flags"), k.ptr(
                "pre_handler")
            if pre == aggr:
                detour = 0
                if flags & KPROBE_FLAG_OPTIMIZED and p.has_struct("optimized_kprobe"):
                    # An optimized probe is an aggregate inside struct optimized_kprobe.
                    detour = mem.u64(node + p.offset("optimized_kprobe", "optinsn")
                                     + p.offset("arch_optimized_insn", "insn"))
                for member in list_for_each(mem, node + list_off, MAX_AGGREGATED):
                    child = probe(member - list_off)
                    out.append(Kprobe(child.address, addr, child.flags | flags,
                                      child.handlers, child.kretprobe, detour))
            else:
                out.append(probe(node))
            node = nxt
    return out


def accounts_for(probes: list[Kprobe], addr: int, found: bytes, text_at: Callable[[int], bytes],
                 ) -> bool:
    """Whether a registered probe explains kernel text differing at ``addr``: the int3 a
    probe plants on its instruction, or an optimized probe's jmp to its own detour."""
    for kp in probes:
        if kp.flags & KPROBE_FLAG_GONE:
            continue
        if kp.addr == addr and found == b"\xcc":
            return True
        if kp.detour and kp.addr <= addr < kp.addr + 5 and addr + len(found) <= kp.addr + 5:
            jmp = text_at(kp.addr)
            if jmp[0] == 0xE9 and (kp.addr + 5 + struct.unpack_from("<i", jmp, 1)[0]) \
                    & (1 << 64) - 1 == kp.detour:
                return True
    return False
