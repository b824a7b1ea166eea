"""Kernel integrity checks: text, syscall table, IDT, modules, hidden modules."""

from __future__ import annotations

import struct
from typing import Any, ClassVar

from vims.checks.base import (
    Category,
    Check,
    CheckError,
    Context,
    Finding,
    NotApplicable,
    Severity,
)
from vims.vmi.linux import (
    MAX_MODULES,
    WalkError,
    is_kernel_pointer,
    list_for_each,
    xen_guest_type,
)
from vims.vmi.memory import GuestMemory, MemoryReadError

PAGE = 4096


def symbolize(ctx: Context, addr: int) -> str:
    """``name+0xoff`` for a runtime address, from the profile's symbols."""
    return ctx.profile.symbolize(addr - ctx.mem.kaslr_offset) if addr else "NULL"


class SyscallTableCheck(Check):
    id: ClassVar[str] = "kernel.syscall_table"
    description: ClassVar[str] = (
        "Each sys_call_table entry points at the handler the profile expects.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES
    needs_pause = False  # static memory: nothing to tear

    def run(self, ctx: Context) -> list[Finding]:
        expected = ctx.profile.syscall_table
        if not expected:
            raise CheckError("the profile has no sys_call_table contents (rebuild the profile)")
        slide = ctx.mem.kaslr_offset
        raw = ctx.mem.read(ctx.mem.sym("sys_call_table"), 8 * len(expected))
        found = struct.unpack(f"<{len(expected)}Q", raw)
        out = []
        for nr, (want, got) in enumerate(zip(expected, found, strict=True)):
            if got != want + slide:
                out.append(self.finding(
                    f"syscall {nr} hooked: points at {symbolize(ctx, got)}",
                    nr=nr, expected=f"0x{want + slide:x}", found=f"0x{got:x}",
                    expected_symbol=symbolize(ctx, want + slide),
                    found_symbol=symbolize(ctx, got)))
        return out


def _gate_bits(bits: int) -> dict[str, int]:
    """``struct idt_bits``: IST in bits 0-2, gate type in 8-11, DPL in 13-14, P in 15."""
    return {"ist": bits & 7, "type": bits >> 8 & 0xF, "dpl": bits >> 13 & 3, "present": bits >> 15}


class IdtCheck(Check):
    id: ClassVar[str] = "kernel.idt"
    description: ClassVar[str] = (
        "Each gate of the IDT the vCPUs use points at the clean baseline's handler, with its "
        "selector, type, DPL and IST.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES
    needs_pause = False  # static memory: nothing to tear

    def run(self, ctx: Context) -> list[Finding]:
        from vims.vmi.linux import idt_gates

        if xen_guest_type(ctx.mem) == "pv":
            raise NotApplicable(
                "Xen PV domain: exceptions and interrupts are dispatched through the trap "
                "table the kernel handed to Xen (HYPERVISOR_set_trap_table), kept in Xen's "
                "memory; idt_table in the guest is not what the CPU uses")
        baseline: list[int] = ctx.need_baseline("idt")
        clean_gates: list[list[int]] | None = (ctx.baseline or {}).get("idt_gates")
        slide = ctx.mem.kaslr_offset
        idt = ctx.mem.sym("idt_table")
        # idt_table, and any other table a vCPU's IDTR loads (the kernel's read-only
        # alias of idt_table counts as idt_table: cpu.state judges the IDTR itself).
        tables = {ctx.mem.kv2p(idt): ("idt_table", idt)}
        for cpu, base in ctx.idtr_bases():
            try:
                phys = ctx.mem.kv2p(base)
            except MemoryReadError:
                raise CheckError(f"vCPU {cpu}'s IDTR 0x{base:x} is not mapped") from None
            tables.setdefault(phys, (f"IDTR of vCPU {cpu}", base))
        out = []
        for table, base in tables.values():
            gates = idt_gates(ctx.mem, base)
            for vec, (want, (got, selector, bits)) in enumerate(zip(baseline, gates,
                                                                    strict=True)):
                want_rt = want + slide if want else 0
                where: dict[str, Any] = {"vector": vec, "table": table,
                                         "table_address": f"0x{base:x}"}
                if got != want_rt:
                    out.append(self.finding(
                        f"IDT vector {vec} ({table}) points at {symbolize(ctx, got)}",
                        **where, expected=f"0x{want_rt:x}", found=f"0x{got:x}",
                        expected_symbol=symbolize(ctx, want_rt),
                        found_symbol=symbolize(ctx, got)))
                elif clean_gates is not None and [selector, bits] != clean_gates[vec]:
                    want_sel, want_bits = clean_gates[vec]
                    out.append(self.finding(
                        f"IDT vector {vec} ({table}) gate changed: selector 0x{selector:x}, "
                        f"{_gate_bits(bits)} (clean: 0x{want_sel:x}, {_gate_bits(want_bits)})",
                        **where, selector=f"0x{selector:x}", gate=_gate_bits(bits),
                        expected_selector=f"0x{want_sel:x}", expected_gate=_gate_bits(want_bits)))
        return out


class ModulesCheck(Check):
    id: ClassVar[str] = "kernel.modules"
    description: ClassVar[str] = "Loaded modules are allowed by the policy and match the baseline."
    severity = Severity.HIGH
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        allow = ctx.policy.get("modules", {}).get("allow")
        known: dict[str, Any] = (ctx.baseline or {}).get("modules", {})
        if allow is None and not known:
            raise CheckError("needs a policy module allowlist or a baseline with modules")
        out = []
        for mod in ctx.modules:
            if allow is not None and mod.name not in allow:
                out.append(self.finding(f"module {mod.name} is not allowlisted",
                                        module=mod.name, base=f"0x{mod.base:x}", size=mod.size))
            elif known and mod.name not in known:
                out.append(self.finding(f"module {mod.name} is not in the baseline",
                                        module=mod.name, size=mod.size))
            elif known and known[mod.name].get("size") not in (None, mod.size):
                out.append(self.finding(f"module {mod.name} has an unexpected size",
                                        module=mod.name, expected=known[mod.name]["size"],
                                        found=mod.size))
        return out


MODULES_VADDR = 0xFFFFFFFFC0000000  # x86_64: __START_KERNEL_map + KERNEL_IMAGE_SIZE (1 GiB)
MODULES_END = 0xFFFFFFFFFF000000
MAX_VMAP_AREAS = 1 << 17
MAX_SCAN_BYTES = 256 << 20
CACHELINE = 64


def kset_modules(ctx: Context) -> set[int]:
    """Modules reachable from ``module_kset`` (what /sys/module shows)."""
    p = ctx.profile
    kset = ctx.mem.u64(ctx.mem.sym("module_kset"))
    if not is_kernel_pointer(kset):
        raise CheckError("module_kset is not a kernel pointer")
    entry_off = p.offset("kobject", "entry")
    kobj_off = p.offset("module_kobject", "kobj")
    mod_off = p.offset("module_kobject", "mod")
    found = set()
    for node in list_for_each(ctx.mem, kset + p.offset("kset", "list"), MAX_MODULES * 4):
        mod = ctx.mem.u64(node - entry_off - kobj_off + mod_off)
        if mod:  # built-in modules have kobjects with mod == NULL
            found.add(mod)
    return found


MAX_VMAP_NODES = 1024


def _vmap_roots(ctx: Context) -> list[int]:
    """The rb-trees of busy vmalloc areas: ``vmap_area_root`` until 6.8, then one
    ``busy.root`` per ``vmap_node`` (``vmap_nodes[0..nr_vmap_nodes)``)."""
    p, mem = ctx.profile, ctx.mem
    if p.has_symbol("vmap_area_root"):
        return [mem.u64(mem.sym("vmap_area_root"))]  # struct rb_root { struct rb_node *; }
    if not (p.has_symbol("vmap_nodes") and p.has_symbol("nr_vmap_nodes")):
        raise CheckError("kernel has neither vmap_area_root nor vmap_nodes")
    nodes, count = mem.u64(mem.sym("vmap_nodes")), mem.u32(mem.sym("nr_vmap_nodes"))
    if not 1 <= count <= MAX_VMAP_NODES or not is_kernel_pointer(nodes):
        raise WalkError(f"vmap_nodes corrupt ({count} nodes)", nodes)
    root, size = p.offset("vmap_node", "busy.root"), p.size("vmap_node")
    return [mem.u64(nodes + i * size + root) for i in range(count)]


def module_areas(ctx: Context) -> list[tuple[int, int]]:
    """vmalloc areas inside the module range, by a range search of the busy trees.

    A tree is ordered by ``va_start`` and module addresses sit at the top of
    the kernel's address space, so only O(log n) other areas are visited.
    """
    p, mem = ctx.profile, ctx.mem
    rb_off = p.offset("vmap_area", "rb_node")
    left, right = p.offset("rb_node", "rb_left"), p.offset("rb_node", "rb_right")
    areas = []
    stack = _vmap_roots(ctx)
    visited = 0
    while stack:
        node = stack.pop()
        if not node:
            continue
        visited += 1
        if visited > MAX_VMAP_AREAS or not is_kernel_pointer(node):
            raise WalkError("vmap_area tree corrupt", node)
        start, end = struct.unpack("<QQ", mem.read(node - rb_off, 16))
        if start >= MODULES_VADDR:
            stack.append(mem.u64(node + left))
        if start < MODULES_END:
            stack.append(mem.u64(node + right))
        if MODULES_VADDR <= start < end <= MODULES_END:
            areas.append((start, end))
    return sorted(areas)


def scanned_modules(ctx: Context) -> set[int]:
    """``struct module``s found by scanning the module area's vmalloc allocations.

    A ``struct module`` is cache-line aligned and its ``mkobj.mod`` points back
    at itself: a self-reference a random word matches by chance only rarely, and
    one an unlinked module keeps (sysfs needs it until the module is freed).
    """
    p, mem = ctx.profile, ctx.mem
    back = p.offset("module", "mkobj") + p.offset("module_kobject", "mod")
    name_off = p.offset("module", "name")
    found: set[int] = set()
    budget = MAX_SCAN_BYTES
    for start, end in module_areas(ctx):
        for page in range(start, end, 4096):
            budget -= 4096
            if budget < 0:
                raise CheckError("module area larger than the scan allows")
            try:
                data = mem.read(page, 4096)
            except MemoryReadError:
                continue  # guard pages and holes
            found |= _self_references(mem, page, data, back, name_off)
    return found


def _self_references(mem: GuestMemory, page: int, data: bytes, back: int,
                     name_off: int) -> set[int]:
    """Candidates ``m`` in this page with ``*(u64 *)(m + back) == m``.

    The word in this page points ``back`` bytes below itself, into this page or
    the previous one: its bits 16..63 are theirs, so ``bytes.find`` locates
    candidates at C speed instead of testing every cache line in Python.
    """
    found: set[int] = set()
    for hi_page in {page - 4096, page}:
        needle = hi_page.to_bytes(8, "little")[2:]  # bits 16..63 of the self-pointer
        at = data.find(needle, 2)
        while at >= 0:
            word_off = at - 2
            value = int.from_bytes(data[word_off:word_off + 8], "little")
            cand = page + word_off - back
            if word_off % 8 == 0 and value == cand and cand % CACHELINE == 0:
                try:
                    name = mem.cstr(cand + name_off, 56)
                except MemoryReadError:
                    name = ""
                if name and name.isprintable():
                    found.add(cand)
            at = data.find(needle, at + 1)
    return found


class HiddenModulesCheck(Check):
    id: ClassVar[str] = "kernel.hidden_modules"
    description: ClassVar[str] = (
        "Cross-view of the module list against the module kset and a scan of module memory.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        listed = {m.address for m in ctx.modules}
        out = []
        seen: set[int] = set()
        for view, mods in (("module_kset", kset_modules(ctx)), ("scan", scanned_modules(ctx))):
            for mod in sorted(mods - listed - seen):
                seen.add(mod)
                name = ctx.mem.cstr(mod + ctx.profile.offset("module", "name"), 56)
                out.append(self.finding(f"module {name} is loaded but hidden from the module list",
                                        module=name, address=f"0x{mod:x}", seen_in=view))
        return out


MAX_SITE_FINDINGS = 64


class KernelTextCheck(Check):
    id: ClassVar[str] = "kernel.text"
    description: ClassVar[str] = (
        "Kernel text equals the clean baseline; runtime patch sites hold only their "
        "legitimate encodings.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES
    needs_pause = False  # static memory: nothing to tear

    def run(self, ctx: Context) -> list[Finding]:
        from vims.vmi.ktext import compare_text, expected_text, read_text

        layout = ctx.profile.text_layout
        try:
            expected = expected_text(ctx.need_baseline("kernel_text"), layout,
                                     ctx.mem.kaslr_offset)
        except ValueError as exc:
            raise CheckError(str(exc)) from exc
        start = ctx.mem.sym("_stext")
        out = []
        text = read_text(ctx.mem)
        diffs, sites = compare_text(text, expected, layout)
        if diffs:
            diffs = self._unprobed(ctx, start, text, diffs)
        for diff in diffs:
            addr = start + diff.offset
            branch = self._branch(ctx, start, text, expected, diff)
            out.append(self.finding(
                f"kernel text modified at {symbolize(ctx, addr)}" + (
                    f": a branch into {branch['target_owner']}" if branch else ""),
                address=f"0x{addr:x}", symbol=symbolize(ctx, addr), page=f"0x{addr & ~0xFFF:x}",
                expected=diff.expected.hex(), found=diff.found.hex(), **branch))
        if sites:
            out += self._judge_sites(ctx, start, sites)
        return out

    @staticmethod
    def _branch(ctx: Context, start: int, text: bytearray, expected: bytes,
                diff: Any) -> dict[str, Any]:
        """Where a changed rel32 call/jmp now goes, when the change lies inside one: a
        re-pointed branch (an ``x64_sys_call`` case, a call site) or a written one."""
        from vims.checks.hooks import code_map
        from vims.vmi.ktext import CALL, JMP, branch_target

        end = diff.offset + len(diff.found)
        for back in range(5):
            i = diff.offset - back
            if i < 0 or end > i + 5 or text[i] not in (CALL, JMP) or (
                    back and expected[i] != text[i]):
                continue
            target = branch_target(start + i, bytes(text[i:i + 5]))
            if target is None:
                continue
            return {"instruction": f"0x{start + i:x}", "target": f"0x{target:x}",
                    "target_symbol": symbolize(ctx, target),
                    "target_owner": code_map(ctx).owner(target)}
        return {}

    @staticmethod
    def _unprobed(ctx: Context, start: int, text: bytearray, diffs: list[Any]) -> list[Any]:
        """Differences no registered kprobe explains (its int3, or an optimized probe's
        jmp to its own detour); kernel.kprobes judges where those probes' handlers are."""
        from vims.checks.hooks import kprobe_state
        from vims.vmi.kprobes import accounts_for

        probes = kprobe_state(ctx)
        if not probes:
            return diffs

        def text_at(addr: int) -> bytes:
            return bytes(text[addr - start:addr - start + 5])

        return [d for d in diffs
                if not accounts_for(probes, start + d.offset, d.found, text_at)]

    def _judge_sites(self, ctx: Context, start: int, sites: list[Any]) -> list[Finding]:
        """Changed patch sites that hold anything but a legitimate encoding."""
        from vims.checks.hooks import code_map, ftrace_state
        from vims.vmi.ktext import Site, branch_target, judge_site

        cmap = code_map(ctx)
        ftrace_targets: set[int] | None = None

        def ftrace_target(addr: int) -> bool:
            nonlocal ftrace_targets
            if ftrace_targets is None:  # walked only when an enabled fentry site needs it
                try:
                    ftrace_targets = ftrace_state(ctx).call_targets(ctx)
                except (WalkError, CheckError) as exc:
                    raise CheckError(
                        f"cannot account for enabled ftrace sites: {exc}") from exc
            return addr in ftrace_targets

        out: list[Finding] = []
        bad = 0
        for change in sites:
            addr = start + change.offset
            reason = judge_site(change, addr, start + change.target if change.target else 0,
                                cmap.known, ftrace_target)
            if reason is None:
                continue
            bad += 1
            if len(out) >= MAX_SITE_FINDINGS:
                continue
            target = branch_target(addr, change.found)
            out.append(self.finding(
                f"{reason} at {symbolize(ctx, addr)}",
                address=f"0x{addr:x}", symbol=symbolize(ctx, addr),
                site=Site(change.kind).name.lower(), page=f"0x{addr & ~0xFFF:x}",
                expected=change.expected.hex(), found=change.found.hex(),
                target=f"0x{target:x}" if target is not None else None,
                target_symbol=symbolize(ctx, target) if target is not None else None,
                target_owner=cmap.owner(target) if target is not None else None))
        if bad > len(out):
            out.append(self.finding(f"{bad - len(out)} more patch sites hold illegitimate code",
                                    more=bad - len(out)))
        return out
