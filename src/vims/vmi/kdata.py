"""Security-relevant kernel data: usermode-helper paths, LSM hooks, tracepoint probes.

What rootkits change besides code:

- the paths the kernel executes as root on its own (``modprobe_path`` on an
  unknown module request, ``core_pattern`` on a crash when it starts with ``|``,
  ``poweroff_cmd``/``reboot_cmd``, ``uevent_helper`` on every uevent);
- the LSM hook lists (``security_hook_heads``: one hlist of
  ``security_hook_list`` per hook), where an added or re-pointed entry runs
  attacker code on every file open or exec;
- tracepoint probes (``struct tracepoint.funcs``), which run on every event:
  what ``linux.tracing.tracepoints`` shows offline.

Every walk is bounded: guest memory is hostile.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vims.vmi.linux import WalkError, is_kernel_pointer
from vims.vmi.memory import GuestMemory, MemoryReadError

#: Kernel strings the kernel runs as root, with their buffer sizes (KMOD_PATH_LEN,
#: CORENAME_MAX_SIZE, POWEROFF_CMD_PATH_LEN, UEVENT_HELPER_PATH_LEN).
HELPER_STRINGS = {"modprobe_path": 256, "core_pattern": 128, "poweroff_cmd": 256,
                  "reboot_cmd": 256, "uevent_helper": 256}
MAX_HOOKS_PER_HEAD = 64
MAX_TRACEPOINTS = 1 << 14
MAX_PROBES = 256
MAX_SPAN = 4 << 20


def helper_strings(mem: GuestMemory) -> dict[str, str]:
    """The helper paths this kernel has, as NUL-terminated text (undecodable bytes
    escaped, so a planted path is shown, never dropped)."""
    out = {}
    for name, size in HELPER_STRINGS.items():
        if mem.profile.has_symbol(name):
            raw = mem.read(mem.sym(name), size).split(b"\0", 1)[0]
            out[name] = raw.decode("utf-8", errors="backslashreplace")
    return out


@dataclass(frozen=True)
class LsmHook:
    hook: str  # the security_hook_heads member, e.g. file_open
    entry: int  # the struct security_hook_list
    func: int


def lsm_hooks(mem: GuestMemory) -> list[LsmHook]:
    """Every entry of every LSM hook list (empty on kernels with static-call LSMs)."""
    p = mem.profile
    if not p.has_symbol("security_hook_heads"):
        return []
    heads = mem.sym("security_hook_heads")
    size = p.size("security_hook_heads")
    raw = mem.read(heads, size)
    hook_off = p.offset("security_hook_list", "hook")
    head_off = p.offset("security_hook_list", "head")
    names = sorted((p.offset("security_hook_heads", m), m) for m in p.members(
        "security_hook_heads"))
    out = []
    for off, name in names:
        node = struct.unpack_from("<Q", raw, off)[0]
        seen = 0
        while node:
            if not is_kernel_pointer(node):
                raise WalkError(f"LSM hook list {name} corrupt", node)
            seen += 1
            if seen > MAX_HOOKS_PER_HEAD:
                raise WalkError(f"LSM hook list {name} longer than {MAX_HOOKS_PER_HEAD}",
                                heads + off)
            entry = mem.read(node, max(hook_off, head_off) + 8)
            if struct.unpack_from("<Q", entry, head_off)[0] != heads + off:
                raise WalkError(f"LSM hook entry on {name} belongs to another list", node)
            out.append(LsmHook(name, node, struct.unpack_from("<Q", entry, hook_off)[0]))
            node = struct.unpack_from("<Q", entry, 0)[0]  # hlist_node.next
    return out


@dataclass(frozen=True)
class TracepointProbe:
    tracepoint: str
    func: int
    data: int


def tracepoint_probes(mem: GuestMemory) -> list[TracepointProbe]:
    """The probes attached to every tracepoint of the kernel image."""
    p = mem.profile
    if not (p.has_symbol("__start___tracepoints_ptrs")
            and p.has_symbol("__stop___tracepoints_ptrs")):
        return []
    lo, hi = mem.sym("__start___tracepoints_ptrs"), mem.sym("__stop___tracepoints_ptrs")
    count = (hi - lo) // 4  # tracepoint_ptr_t: an s32 offset to the tracepoint (PREL32)
    if not 0 <= count <= MAX_TRACEPOINTS:
        raise WalkError(f"{count} tracepoints", lo)
    offsets = struct.unpack(f"<{count}i", mem.read(lo, 4 * count))
    funcs_off, name_off = p.offset("tracepoint", "funcs"), p.offset("tracepoint", "name")
    func_size = p.size("tracepoint_func")
    data_off = p.offset("tracepoint_func", "data")
    tps = [lo + 4 * i + rel for i, rel in enumerate(offsets)]
    # The tracepoints sit together in the image's __tracepoints section: one read of
    # the span instead of a read per tracepoint (a few ms a round on 6.1's ~770).
    span_lo, span_hi = (min(tps), max(tps) + p.size("tracepoint")) if tps else (0, 0)
    span = mem.read(span_lo, span_hi - span_lo) if 0 < span_hi - span_lo <= MAX_SPAN else b""
    out = []
    for tp in tps:
        if span:
            funcs = struct.unpack_from("<Q", span, tp - span_lo + funcs_off)[0]
        else:
            funcs = mem.u64(tp + funcs_off)
        if not funcs:
            continue
        if not is_kernel_pointer(funcs):
            raise WalkError("tracepoint probe array outside kernel space", tp)
        try:
            name = mem.cstr(mem.u64(tp + name_off), 128)
        except MemoryReadError:
            name = f"0x{tp:x}"
        for j in range(MAX_PROBES + 1):
            if j == MAX_PROBES:
                raise WalkError(f"tracepoint {name} has more than {MAX_PROBES} probes", tp)
            entry = mem.read(funcs + j * func_size, data_off + 8)
            func, data = struct.unpack_from("<Q", entry, 0)[0], struct.unpack_from(
                "<Q", entry, data_off)[0]
            if not func:
                break
            out.append(TracepointProbe(name, func, data))
    return out
