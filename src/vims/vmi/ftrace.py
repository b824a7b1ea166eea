"""The kernel's ftrace state, read from guest memory: registered ops and direct calls.

Rootkits for 5.x/6.x kernels (KoviD, Singularity, Caraxes) hook system calls by
registering an ``ftrace_ops`` whose ``func`` is their handler and whose filter
hash names the hooked functions; BPF trampolines and livepatch go through the
same machinery. What the kernel runs is reachable from three places, walked
here with bounds, since guest memory is hostile:

- ``ftrace_ops_list``: every registered ops, ending at ``&ftrace_list_end``; each
  ops' ``func`` (the handler), its ``trampoline`` (a copy of the ftrace caller
  that ftrace allocates per ops and that the patched call sites may call
  directly) and its filter hash (the hooked functions; empty means all);
- ``direct_functions``: the hash of direct-call targets (ip -> trampoline);
- the ftrace caller's own call sites, judged with the kernel text (vims.vmi.ktext).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vims.vmi.linux import WalkError, is_kernel_pointer
from vims.vmi.memory import GuestMemory

MAX_OPS = 4096
MAX_HASH_BITS = 16  # FTRACE_HASH_MAX_BITS is 12
MAX_HASH_ENTRIES = 1 << 17  # more than every traceable function of a distribution kernel
MAX_TRAMPOLINE = 1 << 16


@dataclass(frozen=True)
class FtraceOps:
    """One registered ``struct ftrace_ops``."""

    address: int
    func: int
    flags: int
    trampoline: int
    trampoline_size: int
    functions: tuple[int, ...]  # filter hash ips, sorted; empty: every function
    notrace: int  # entries in the notrace hash


def _hash_entries(mem: GuestMemory, hash_ptr: int, budget: list[int],
                  ) -> list[tuple[int, int]]:
    """(ip, direct) of every entry of a ``struct ftrace_hash``; bounded by ``budget``."""
    if not hash_ptr:
        return []
    if not is_kernel_pointer(hash_ptr):
        raise WalkError("ftrace hash pointer outside kernel space", hash_ptr)
    p = mem.profile
    size_bits, buckets, count = struct.unpack_from(
        "<QQQ", mem.read(hash_ptr, 24))
    if p.offset("ftrace_hash", "buckets") != 8 or p.offset("ftrace_hash", "count") != 16:
        raise WalkError("unexpected struct ftrace_hash layout", hash_ptr)
    if not count:
        return []
    if size_bits > MAX_HASH_BITS or count > MAX_HASH_ENTRIES:
        raise WalkError(f"ftrace hash of {count} entries in 2^{size_bits} buckets", hash_ptr)
    if not is_kernel_pointer(buckets):
        raise WalkError("ftrace hash buckets outside kernel space", hash_ptr)
    n = 1 << size_bits
    heads = struct.unpack(f"<{n}Q", mem.read(buckets, 8 * n))
    ip_off = p.offset("ftrace_func_entry", "ip")
    direct_off = (p.offset("ftrace_func_entry", "direct")
                  if p.has_member("ftrace_func_entry", "direct") else None)
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for head in heads:
        node = head
        while node:
            if not is_kernel_pointer(node) or node in seen:
                raise WalkError("ftrace hash chain corrupt", node)
            budget[0] -= 1
            if budget[0] < 0 or len(seen) > count:
                raise WalkError(f"ftrace hash holds more than its count ({count})", hash_ptr)
            seen.add(node)
            raw = mem.read(node, max(ip_off, direct_off or 0) + 8)
            ip = struct.unpack_from("<Q", raw, ip_off)[0]
            direct = struct.unpack_from("<Q", raw, direct_off)[0] if direct_off else 0
            out.append((ip, direct))
            node = struct.unpack_from("<Q", raw, 0)[0]  # hlist_node.next, first member
    return out


def registered_ops(mem: GuestMemory) -> list[FtraceOps]:
    """Every ``ftrace_ops`` on ``ftrace_ops_list``, in list order."""
    p = mem.profile
    end = mem.sym("ftrace_list_end")
    size = p.size("ftrace_ops")
    off = {m: p.offset("ftrace_ops", m) for m in
           ("func", "next", "flags", "func_hash", "trampoline", "trampoline_size")}
    filter_off = p.offset("ftrace_ops_hash", "filter_hash")
    notrace_off = p.offset("ftrace_ops_hash", "notrace_hash")
    budget = [MAX_HASH_ENTRIES]
    out: list[FtraceOps] = []
    seen: set[int] = set()
    node = mem.u64(mem.sym("ftrace_ops_list"))
    while node != end:
        if not is_kernel_pointer(node) or node in seen:
            raise WalkError("ftrace_ops_list corrupt", node)
        if len(seen) >= MAX_OPS:
            raise WalkError(f"ftrace_ops_list longer than {MAX_OPS}", node)
        seen.add(node)
        raw = mem.read(node, size)

        def q(member: str, raw: bytes = raw) -> int:
            value: int = struct.unpack_from("<Q", raw, off[member])[0]
            return value

        functions: list[int] = []
        notrace = 0
        func_hash = q("func_hash")
        if func_hash:
            if not is_kernel_pointer(func_hash):
                raise WalkError("ftrace_ops func_hash outside kernel space", node)
            hashes = mem.read(func_hash, max(filter_off, notrace_off) + 8)
            filt = struct.unpack_from("<Q", hashes, filter_off)[0]
            functions = [ip for ip, _ in _hash_entries(mem, filt, budget)]
            notrace = len(_hash_entries(mem, struct.unpack_from("<Q", hashes, notrace_off)[0],
                                        budget))
        tramp_size = q("trampoline_size")
        if tramp_size > MAX_TRAMPOLINE:
            raise WalkError(f"ftrace trampoline of {tramp_size} bytes", node)
        out.append(FtraceOps(address=node, func=q("func"), flags=q("flags"),
                             trampoline=q("trampoline"), trampoline_size=tramp_size,
                             functions=tuple(sorted(functions)), notrace=notrace))
        node = q("next")
    return out


def direct_calls(mem: GuestMemory) -> list[tuple[int, int]]:
    """(traced ip, direct target) of every registered direct call (BPF trampolines)."""
    if not mem.profile.has_symbol("direct_functions"):
        return []
    return [(ip, d) for ip, d in _hash_entries(mem, mem.u64(mem.sym("direct_functions")),
                                                [MAX_HASH_ENTRIES]) if d]
