"""Loaded eBPF programs and links, read from the kernel's ID maps.

Every loaded program has an ID in ``prog_idr`` and every link (an attachment
that outlives its loader's file descriptors) one in ``link_idr``: the two maps
``bpftool prog``/``bpftool link`` list. Both are IDRs, i.e. XArrays: a tree of
64-slot ``xa_node``s whose internal pointers are tagged ``0b10``. TripleCross,
ebpfkit and boopkit are such programs: kprobe/tracepoint programs that rewrite
system-call results in user memory (``bpf_probe_write_user``) or skip a kernel
function (``bpf_override_return``), XDP/TC programs that wait for magic packets.

A program's *translated* instructions stay in ``bpf_prog.insnsi`` after JIT
(``bpftool prog dump xlated`` reads them); a helper call there is ``call imm``
with ``imm = helper - __bpf_call_base``, so the helpers a program calls are
known by symbol, whatever name the loader gave the program.

Where a perf-attached program runs is not in the program: a kprobe program
hangs off its ``trace_kprobe``'s event (``trace_event_call.prog_array``), found
through the kprobe in ``kprobe_table``; a raw tracepoint, tracing or LSM
program names its target in its link or in ``prog->aux->attach_func_name``.

Every walk is bounded: guest memory is hostile.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vims.vmi.errors import ProfileError
from vims.vmi.linux import Struct, WalkError, is_kernel_pointer
from vims.vmi.memory import GuestMemory, MemoryReadError

XA_CHUNK_SHIFT = 6  # include/linux/xarray.h, with CONFIG_BASE_SMALL=0 (every distro kernel)
XA_CHUNK_SIZE = 1 << XA_CHUNK_SHIFT
MAX_IDR_ENTRIES = 1 << 12  # programs or links; a guest with more is an error, not a pass
MAX_XA_NODES = 1 << 12
MAX_INSNS = 1 << 16  # of BPF_COMPLEXITY_LIMIT_INSNS (1M); larger programs are read in part
MAX_INSNS_PER_ROUND = 1 << 20  # 8 MiB of instructions over all programs of a round
MAX_PROG_ARRAY = 64
BPF_CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_OBJ_NAME_LEN = 16


def xa_entries(mem: GuestMemory, xa: int,
               limit: int = MAX_IDR_ENTRIES) -> Iterator[tuple[int, int]]:
    """Yield ``(index, entry)`` of every present pointer entry of the XArray at ``xa``.

    Internal entries are followed only when they are node pointers; sibling,
    retry and zero entries are skipped; every node must carry the shift its depth
    implies, so a crafted cycle or a node pointing into itself ends the walk.
    """
    p = mem.profile
    head = mem.u64(xa + p.offset("xarray", "xa_head"))
    shift_off, slots_off = p.offset("xa_node", "shift"), p.offset("xa_node", "slots")
    nodes = entries = 0

    def is_node(entry: int) -> bool:
        return entry & 3 == 2 and entry > 4096

    def walk(entry: int, index: int, want_shift: int | None) -> Iterator[tuple[int, int]]:
        nonlocal nodes, entries
        if not entry:
            return
        if not is_node(entry):
            if entry & 3:
                return  # a value, sibling, retry or zero entry: no object behind it
            entries += 1
            if entries > limit:
                raise WalkError(f"XArray holds more than {limit} entries", xa)
            yield index, entry
            return
        node = entry - 2
        if not is_kernel_pointer(node):
            raise WalkError("XArray node pointer outside kernel space", node)
        nodes += 1
        if nodes > MAX_XA_NODES:
            raise WalkError(f"XArray has more than {MAX_XA_NODES} nodes", xa)
        raw = mem.read(node, slots_off + 8 * XA_CHUNK_SIZE)
        shift = raw[shift_off]
        if shift % XA_CHUNK_SHIFT or shift > 64 - XA_CHUNK_SHIFT or (
                want_shift is not None and shift != want_shift):
            raise WalkError(f"XArray node with shift {shift}", node)
        slots = struct.unpack_from(f"<{XA_CHUNK_SIZE}Q", raw, slots_off)
        for i, slot in enumerate(slots):
            if slot and (shift or not is_node(slot)):
                yield from walk(slot, index | i << shift,
                                shift - XA_CHUNK_SHIFT if is_node(slot) else None)
            elif slot:
                raise WalkError("XArray leaf node holds a node pointer", node)

    yield from walk(head, 0, None)


@dataclass(frozen=True)
class BpfProg:
    address: int
    id: int
    type: str  # lower-case bpf_prog_type without its prefix: "kprobe", "xdp", ...
    attach_type: str  # expected_attach_type, likewise: "trace_fentry", "lsm_mac", ...
    name: str
    tag: str  # the 8-byte SHA-1 prefix bpftool shows
    load_time_ns: int  # boot-time clock at load
    uid: int | None
    helpers: tuple[str, ...]  # helpers called, symbolized; "0x..." for unknown targets
    insns: int
    attach_func: str | None  # tracing/LSM/ext target named by the verifier
    jited: bool
    helpers_read: bool  # every instruction read (within the bounds of one round)
    targets: list[str] = field(default_factory=list)  # where it is attached, found later

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "tag": self.tag, "type": self.type,
                "attach_type": self.attach_type, "attached_to": self.targets or None,
                "helpers": list(self.helpers), "insns": self.insns,
                "load_time_s": round(self.load_time_ns / 1e9, 3), "uid": self.uid,
                "prog": f"0x{self.address:x}"}


@dataclass(frozen=True)
class BpfLink:
    address: int
    id: int
    type: str  # lower-case bpf_link_type without its prefix: "raw_tracepoint", ...
    prog: int  # the struct bpf_prog it runs
    target: str | None


def _enum_names(mem: GuestMemory, enum: str, prefix: str) -> dict[int, str]:
    try:
        consts = mem.profile.enum(enum)
    except ProfileError:
        return {}
    return {v: k.removeprefix(prefix).lower() for k, v in consts.items()}


def _helpers(mem: GuestMemory, prog: int, count: int) -> tuple[str, ...]:
    """The helpers a program's translated instructions call, in first-call order."""
    p = mem.profile
    if not p.has_symbol("__bpf_call_base"):
        return ()
    base = mem.sym("__bpf_call_base")
    raw = mem.read(prog + p.offset("bpf_prog", "insnsi"), 8 * min(count, MAX_INSNS))
    seen: dict[str, None] = {}
    for (code, regs, _off, imm) in struct.iter_unpack("<BBhi", raw):
        if code == BPF_CALL and regs >> 4 == 0:  # src_reg 0: a helper, not a subprog/kfunc
            addr = (base + imm) & (1 << 64) - 1
            seen.setdefault(p.symbolize(addr - mem.kaslr_offset), None)
    return tuple(seen)


def loaded_programs(mem: GuestMemory) -> list[BpfProg]:
    """Every program in ``prog_idr``."""
    p = mem.profile
    if not p.has_symbol("prog_idr"):
        return []
    types = _enum_names(mem, "bpf_prog_type", "BPF_PROG_TYPE_")
    attach = _enum_names(mem, "bpf_attach_type", "BPF_")
    xa = mem.sym("prog_idr") + p.offset("idr", "idr_rt")
    out = []
    budget = MAX_INSNS_PER_ROUND
    for _, addr in xa_entries(mem, xa):
        if not is_kernel_pointer(addr):
            raise WalkError("bpf_prog pointer outside kernel space", addr)
        prog = Struct(mem, "bpf_prog", addr, mem.read(addr, p.offset("bpf_prog", "insnsi")))
        aux_ptr = prog.ptr("aux")
        if not is_kernel_pointer(aux_ptr):
            raise WalkError("bpf_prog.aux outside kernel space", addr)
        aux = Struct(mem, "bpf_prog_aux", aux_ptr)
        if aux.ptr("prog") != addr:
            raise WalkError("bpf_prog_aux does not point back at its program", aux_ptr)
        count = prog.u32("len")
        readable = min(count, MAX_INSNS, budget)
        budget -= readable
        uid = None
        if p.has_member("bpf_prog_aux", "user"):
            user = aux.ptr("user")
            if is_kernel_pointer(user):
                try:
                    uid = mem.u32(user + p.offset("user_struct", "uid"))
                except MemoryReadError:
                    uid = None
        func_name = None
        if p.has_member("bpf_prog_aux", "attach_func_name") and aux.ptr("attach_func_name"):
            try:
                func_name = mem.cstr(aux.ptr("attach_func_name"), 128)
            except MemoryReadError:
                func_name = f"0x{aux.ptr('attach_func_name'):x} (unreadable)"
        bit = p.member("bpf_prog", "jited").bit_offset  # a one-bit bitfield
        jited = bool(prog.raw[bit // 8] >> bit % 8 & 1)
        out.append(BpfProg(
            address=addr, id=aux.u32("id"),
            type=types.get(prog.u32("type"), str(prog.u32("type"))),
            attach_type=attach.get(prog.u32("expected_attach_type"),
                                   str(prog.u32("expected_attach_type"))),
            name=aux.cstr("name", BPF_OBJ_NAME_LEN),
            tag=prog.raw[prog.off("tag"):prog.off("tag") + 8].hex(),
            load_time_ns=mem.u64(aux.addr_of("load_time")), uid=uid,
            helpers=_helpers(mem, addr, readable), insns=count,
            attach_func=func_name, jited=jited, helpers_read=readable == count))
    return out


def _prog_array(mem: GuestMemory, array: int) -> list[int]:
    """The programs of a ``bpf_prog_array`` (NULL-terminated ``items[]``)."""
    p = mem.profile
    if not array:
        return []
    if not is_kernel_pointer(array):
        raise WalkError("bpf_prog_array outside kernel space", array)
    step, first = p.size("bpf_prog_array_item"), p.offset("bpf_prog_array", "items")
    out: list[int] = []
    for i in range(MAX_PROG_ARRAY + 1):
        if i == MAX_PROG_ARRAY:
            raise WalkError(f"bpf_prog_array longer than {MAX_PROG_ARRAY}", array)
        prog = mem.u64(array + first + i * step)
        if not prog:
            return out
        out.append(prog)
    return out


def _tracepoint_name(mem: GuestMemory, tp: int) -> str:
    try:
        return mem.cstr(mem.u64(tp + mem.profile.offset("tracepoint", "name")), 128)
    except MemoryReadError:
        return f"tracepoint 0x{tp:x}"


def kprobe_attachments(mem: GuestMemory, kprobes: list[tuple[int, int]]) -> dict[int, list[str]]:
    """Programs run by trace-kprobe events, from ``(struct kprobe, probed address)`` pairs
    of probes whose handler is ``kprobe_dispatcher``/``kretprobe_dispatcher``: the
    kprobe is ``trace_kprobe.rp.kp``, and the event's call holds the program array."""
    p = mem.profile
    if not (p.has_struct("trace_kprobe") and p.has_member("trace_event_call", "prog_array")):
        return {}
    kp_off = p.offset("trace_kprobe", "rp.kp")
    event_off = p.offset("trace_kprobe", "tp.event")
    call_off = p.offset("trace_probe_event", "call")
    array_off = p.offset("trace_event_call", "prog_array")
    out: dict[int, list[str]] = {}
    for kp, addr in kprobes:
        event = mem.u64(kp - kp_off + event_off)
        if not is_kernel_pointer(event):
            continue
        where = p.symbolize(addr - mem.kaslr_offset)
        for prog in _prog_array(mem, mem.u64(event + call_off + array_off)):
            out.setdefault(prog, []).append(f"kprobe {where}")
    return out


def link_targets(mem: GuestMemory) -> list[BpfLink]:
    """Every link in ``link_idr`` and, for the kinds that say so, where it attaches."""
    p = mem.profile
    if not p.has_symbol("link_idr"):
        return []
    types = _enum_names(mem, "bpf_link_type", "BPF_LINK_TYPE_")
    out: list[BpfLink] = []
    for _, addr in xa_entries(mem, mem.sym("link_idr") + p.offset("idr", "idr_rt")):
        if not is_kernel_pointer(addr):
            raise WalkError("bpf_link pointer outside kernel space", addr)
        link = Struct(mem, "bpf_link", addr)
        kind = types.get(link.u32("type"), str(link.u32("type")))
        target: str | None = None
        try:
            if kind == "raw_tracepoint" and p.has_struct("bpf_raw_tp_link"):
                btp = mem.u64(addr + p.offset("bpf_raw_tp_link", "btp"))
                target = "raw_tracepoint " + _tracepoint_name(
                    mem, mem.u64(btp + p.offset("bpf_raw_event_map", "tp")))
            elif kind == "kprobe_multi" and p.has_struct("bpf_kprobe_multi_link"):
                ml = Struct(mem, "bpf_kprobe_multi_link", addr)
                cnt, addrs = ml.u32("cnt"), ml.ptr("addrs")
                shown = struct.unpack(f"<{min(cnt, 8)}Q", mem.read(addrs, 8 * min(cnt, 8)))
                target = "kprobe_multi " + ", ".join(
                    p.symbolize(a - mem.kaslr_offset) for a in shown) + (
                    f" (+{cnt - 8} more)" if cnt > 8 else "")
            elif kind == "perf_event" and p.has_struct("bpf_perf_link"):
                file = mem.u64(addr + p.offset("bpf_perf_link", "perf_file"))
                event = mem.u64(file + p.offset("file", "private_data"))
                call = mem.u64(event + p.offset("perf_event", "tp_event"))
                target = "perf event " + trace_event_name(mem, call) if call else None
            elif kind == "xdp" and p.has_struct("bpf_xdp_link"):
                dev = mem.u64(addr + p.offset("bpf_xdp_link", "dev"))
                target = "xdp on " + mem.cstr(dev + p.offset("net_device", "name"), 16) \
                    if dev else None
        except MemoryReadError:
            target = f"{kind} (target unreadable)"
        out.append(BpfLink(addr, link.u32("id"), kind, link.ptr("prog"), target))
    return out


# include/linux/trace_events.h: TRACE_EVENT_FL_TRACEPOINT_BIT, 4 since Linux 3.11; an
# anonymous enum, so not in the profile by name.
TRACE_EVENT_FL_TRACEPOINT = 1 << 4


def trace_event_name(mem: GuestMemory, call: int) -> str:
    """A ``trace_event_call``'s name: its tracepoint's, or its own (kprobe events)."""
    p = mem.profile
    ev = Struct(mem, "trace_event_call", call)
    named = ev.ptr("name") if p.has_member("trace_event_call", "name") else ev.ptr("tp")
    if ev.u32("flags") & TRACE_EVENT_FL_TRACEPOINT:
        return _tracepoint_name(mem, named)
    try:
        return mem.cstr(named, 128)
    except MemoryReadError:
        return f"event 0x{call:x}"


MAX_TRACE_EVENTS = 1 << 15


def trace_event_attachments(mem: GuestMemory) -> dict[int, list[str]]:
    """Programs attached to trace events (tracepoints, tracefs kprobe events), from the
    ``ftrace_events`` list: what perf-attached tracepoint programs hang off."""
    from vims.vmi.linux import list_for_each

    p = mem.profile
    if not (p.has_symbol("ftrace_events") and p.has_member("trace_event_call", "prog_array")):
        return {}
    list_off = p.offset("trace_event_call", "list")
    array_off = p.offset("trace_event_call", "prog_array")
    out: dict[int, list[str]] = {}
    for node in list_for_each(mem, mem.sym("ftrace_events"), MAX_TRACE_EVENTS):
        array = mem.u64(node - list_off + array_off)
        if array:
            name = trace_event_name(mem, node - list_off)
            for prog in _prog_array(mem, array):
                out.setdefault(prog, []).append(f"trace event {name}")
    return out
