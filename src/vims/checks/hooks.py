"""Where kernel code may live, and the hooks that redirect it: ftrace, LSM hooks,
tracepoint probes, and the kernel data that names what the kernel executes.

A hook's handler is judged by the memory it lives in. *Known code* is the
kernel's text and the text of modules the C-VM is expected to run (those the
policy allows, else those the baseline lists). A handler anywhere else, in
a module nobody expected, in module-area memory no module owns any more (the
module that installed it unloaded or unlinked itself), or outside both, is
what a rootkit leaves behind.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
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
from vims.checks.kernel import MODULES_END, MODULES_VADDR, symbolize
from vims.checks.rules import glob_any
from vims.vmi.ftrace import FtraceOps, direct_calls, registered_ops
from vims.vmi.kprobes import Kprobe, registered_kprobes
from vims.vmi.linux import WalkError

FTRACE_OPS_FL_SAVE_REGS = 1 << 2  # include/linux/ftrace.h, unchanged since 3.7
MAX_LISTED = 32  # hooked functions named in one finding's evidence


@dataclass(frozen=True)
class CodeMap:
    """Kernel text and module text ranges of one round, runtime addresses."""

    kernel: tuple[int, int]
    regions: tuple[tuple[int, int, str, bool], ...]  # (start, end, module, known), sorted

    def _region(self, addr: int) -> tuple[int, int, str, bool] | None:
        i = bisect.bisect_right(self.regions, (addr, 1 << 64)) - 1
        if i >= 0 and self.regions[i][0] <= addr < self.regions[i][1]:
            return self.regions[i]
        return None

    def known(self, addr: int) -> bool:
        if self.kernel[0] <= addr < self.kernel[1]:
            return True
        region = self._region(addr)
        return region is not None and region[3]

    def owner(self, addr: int) -> str:
        """Where an address lives, in words an analyst can check."""
        if self.kernel[0] <= addr < self.kernel[1]:
            return "kernel text"
        region = self._region(addr)
        if region is not None:
            start, _, name, known = region
            return f"text of module {name}+0x{addr - start:x}" + (
                "" if known else " (a module the policy and baseline do not know)")
        if MODULES_VADDR <= addr < MODULES_END:
            return "module area memory that no loaded module owns"
        return "memory outside kernel and module text"

    def handler(self, addr: int) -> dict[str, Any]:
        """A hook handler's evidence: its address and the memory it lives in."""
        return {"handler": f"0x{addr:x}", "handler_owner": self.owner(addr)}


def code_map(ctx: Context) -> CodeMap:
    """The round's code map, built once per round."""
    cached: CodeMap | None = ctx.memo.get("code_map")
    if cached is not None:
        return cached
    allow = ctx.policy.get("modules", {}).get("allow")
    baseline: dict[str, Any] = (ctx.baseline or {}).get("modules", {})
    regions = []
    for mod in ctx.modules:
        known = (mod.name in allow) if allow is not None else (
            not baseline or mod.name in baseline)
        if mod.base and mod.text_size:
            regions.append((mod.base, mod.base + mod.text_size, mod.name, known))
    cmap = CodeMap((ctx.mem.sym("_stext"), ctx.mem.sym("_etext")), tuple(sorted(regions)))
    ctx.memo["code_map"] = cmap
    return cmap


@dataclass(frozen=True)
class FtraceState:
    ops: list[FtraceOps]
    direct: list[tuple[int, int]]

    def call_targets(self, ctx: Context) -> set[int]:
        """Where an enabled fentry site may call: the ftrace callers, each registered
        ops' trampoline and each direct-call target."""
        fixed = {ctx.mem.sym(n) for n in ("ftrace_caller", "ftrace_regs_caller", "__fentry__")
                 if ctx.profile.has_symbol(n)}
        return (fixed | {o.trampoline for o in self.ops if o.trampoline}
                | {target for _, target in self.direct})


def ftrace_state(ctx: Context) -> FtraceState:
    """Registered ftrace ops and direct calls, walked once per round."""
    cached: FtraceState | None = ctx.memo.get("ftrace")
    if cached is None:
        if not ctx.profile.has_symbol("ftrace_ops_list"):
            raise CheckError("kernel built without dynamic ftrace (no ftrace_ops_list)")
        cached = FtraceState(registered_ops(ctx.mem), direct_calls(ctx.mem))
        ctx.memo["ftrace"] = cached
    return cached


def trampoline_call(ctx: Context, ops: FtraceOps) -> tuple[int, bytes] | None:
    """The call inside an ops' trampoline (a copy of the ftrace caller) and its bytes."""
    if not ops.trampoline:
        return None
    regs = ops.flags & FTRACE_OPS_FL_SAVE_REGS
    start, call = ("ftrace_regs_caller", "ftrace_regs_call") if regs else (
        "ftrace_caller", "ftrace_call")
    if not (ctx.profile.has_symbol(start) and ctx.profile.has_symbol(call)):
        return None
    offset = ctx.profile.symbol(call) - ctx.profile.symbol(start)
    if not 0 <= offset <= ops.trampoline_size - 5:
        return None  # a static trampoline (size 0): its call is kernel text, judged there
    site = ops.trampoline + offset
    return site, ctx.mem.read(site, 5)


class FtraceCheck(Check):
    id: ClassVar[str] = "kernel.ftrace"
    description: ClassVar[str] = (
        "Every ftrace handler, trampoline call and direct call lands in known code.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        from vims.vmi.ktext import CALL, branch_target

        try:
            state = ftrace_state(ctx)
        except WalkError as exc:
            raise CheckError(f"ftrace structures corrupt: {exc}") from exc
        cmap = code_map(ctx)
        allow_direct = set(ctx.policy.get("ftrace", {}).get("allow_direct", []))
        out = []
        for ops in state.ops:
            # Filter-hash entries are fentry sites: the function's entry, or just past its
            # ENDBR64 on IBT kernels (6.12): named by function.
            hooked = [symbolize(ctx, ip).split("+")[0] for ip in ops.functions[:MAX_LISTED]]
            where: dict[str, Any] = {"ops": f"0x{ops.address:x}", "hooked": hooked,
                     "hooked_count": len(ops.functions) or "all functions",
                     "trampoline": f"0x{ops.trampoline:x}"}
            what = ", ".join(hooked[:3]) + (" …" if len(ops.functions) > 3 else "") \
                if ops.functions else "every function"
            if not cmap.known(ops.func):
                out.append(self.finding(
                    f"ftrace handler 0x{ops.func:x} in {cmap.owner(ops.func)} hooks {what}",
                    **cmap.handler(ops.func), **where))
            call = trampoline_call(ctx, ops)
            if call is not None:
                site, code = call
                target = branch_target(site, code)
                if code[0] != CALL or target is None or not cmap.known(target):
                    owner = cmap.owner(target) if target is not None else "no call"
                    out.append(self.finding(
                        f"ftrace trampoline 0x{ops.trampoline:x} calls into {owner} "
                        f"for {what}", site=f"0x{site:x}", found=code.hex(),
                        target=f"0x{target:x}" if target is not None else None,
                        target_owner=owner, **where))
        for ip, target in state.direct:
            name = symbolize(ctx, ip)
            if name.split("+")[0] in allow_direct:
                continue
            out.append(self.finding(
                f"direct call from {name} to 0x{target:x} in {cmap.owner(target)}",
                Severity.HIGH if cmap.known(target) else Severity.CRITICAL,
                hooked=name, target=f"0x{target:x}", target_owner=cmap.owner(target)))
        return out


class KernelDataCheck(Check):
    id: ClassVar[str] = "kernel.data"
    description: ClassVar[str] = (
        "Usermode-helper paths equal the clean baseline; LSM hooks and tracepoint probes "
        "run known code.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        from vims.vmi.kdata import helper_strings, lsm_hooks, tracepoint_probes

        clean: dict[str, Any] = ctx.need_baseline("kernel_data")
        allow: dict[str, list[str]] = ctx.policy.get("kernel_data", {}).get("allow", {})
        out = []
        for name, value in helper_strings(ctx.mem).items():
            want = clean.get("strings", {}).get(name)
            if value != want and not glob_any(value, allow.get(name, [])):
                out.append(self.finding(f"{name} is {value!r}, the clean guest's is {want!r}",
                                        variable=name, expected=want, found=value))
        cmap = code_map(ctx)
        try:
            hooks = lsm_hooks(ctx.mem)
            probes = tracepoint_probes(ctx.mem)
        except WalkError as exc:
            raise CheckError(f"kernel hook lists corrupt: {exc}") from exc
        for hook in hooks:
            if not cmap.known(hook.func):
                out.append(self.finding(
                    f"LSM hook {hook.hook} runs 0x{hook.func:x} in {cmap.owner(hook.func)}",
                    hook=hook.hook, entry=f"0x{hook.entry:x}", **cmap.handler(hook.func)))
        if "lsm_hooks" in clean and len(hooks) != clean["lsm_hooks"]:
            out.append(self.finding(
                f"the LSM hook lists hold {len(hooks)} entries, the clean guest's "
                f"{clean['lsm_hooks']}", Severity.HIGH, expected=clean["lsm_hooks"],
                found=len(hooks)))
        for probe in probes:
            if not cmap.known(probe.func):
                out.append(self.finding(
                    f"tracepoint {probe.tracepoint} probe 0x{probe.func:x} in "
                    f"{cmap.owner(probe.func)}", tracepoint=probe.tracepoint,
                    data=f"0x{probe.data:x}", **cmap.handler(probe.func)))
        return out + self._permissions(ctx)

    def _permissions(self, ctx: Context) -> list[Finding]:
        """Kernel text, read-only data (``sys_call_table``), ``__ro_after_init`` data
        (LSM hook heads) and the IDT the vCPUs load must not be writable: rootkits
        flip a PTE's RW bit (``set_memory_rw``) rather than CR0.WP to patch them."""
        from vims.vmi.linux import xen_guest_type
        from vims.vmi.memory import MemoryReadError

        if xen_guest_type(ctx.mem) == "pv":
            return []  # Xen validates a PV guest's page tables; not judged here yet
        regions = [(name, ctx.mem.sym(lo), ctx.mem.sym(hi)) for name, lo, hi in (
            ("kernel text", "_stext", "_etext"),
            ("read-only data", "__start_rodata", "__end_rodata"),
            ("ro-after-init data", "__start_ro_after_init", "__end_ro_after_init"))
            if ctx.profile.has_symbol(lo) and ctx.profile.has_symbol(hi)]
        regions += [(f"IDT loaded by vCPU {cpu}", base, base + 4096)
                    for cpu, base in ctx.idtr_bases()]
        out = []
        for name, lo, hi in regions:
            runs: list[list[int]] = []
            try:
                for vaddr, size, writable, _ in ctx.mem.kernel_mappings(lo, hi):
                    if not writable:
                        continue
                    if runs and runs[-1][1] == vaddr:
                        runs[-1][1] = vaddr + size
                    else:
                        runs.append([vaddr, vaddr + size])
            except MemoryReadError as exc:
                raise CheckError(f"page tables of the {name} unreadable: {exc}") from exc
            for start, end in runs[:MAX_LISTED]:
                out.append(self.finding(
                    f"{name} is writable at 0x{start:x}-0x{end:x} "
                    f"({symbolize(ctx, start)})", region=name, start=f"0x{start:x}",
                    end=f"0x{end:x}", symbol=symbolize(ctx, start)))
        return out


def kprobe_state(ctx: Context) -> list[Kprobe]:
    """Registered kprobes, walked once per round."""
    cached: list[Kprobe] | None = ctx.memo.get("kprobes")
    if cached is None:
        try:
            cached = registered_kprobes(ctx.mem)
        except WalkError as exc:
            raise CheckError(f"kprobe_table corrupt: {exc}") from exc
        ctx.memo["kprobes"] = cached
    return cached


class KprobesCheck(Check):
    id: ClassVar[str] = "kernel.kprobes"
    description: ClassVar[str] = (
        "Every kprobe's and kretprobe's handlers land in known code.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:

        allow = set(ctx.policy.get("kprobes", {}).get("allow", []))
        cmap = code_map(ctx)
        out = []
        for kp in kprobe_state(ctx):
            probed = symbolize(ctx, kp.addr)
            if probed.split("+")[0] in allow:
                continue
            kind = "kretprobe" if kp.kretprobe else "kprobe"
            for role, func in kp.handlers:
                if not cmap.known(func):
                    out.append(self.finding(
                        f"{kind} on {probed} runs its {role} 0x{func:x} in {cmap.owner(func)}",
                        probed=probed, address=f"0x{kp.addr:x}", kprobe=f"0x{kp.address:x}",
                        role=role, flags=kp.flags, **cmap.handler(func)))
        return out


#: Program types that run on kernel events or packets: what eBPF rootkits load.
#: Socket filters and cgroup programs (systemd loads some) are listed, not judged.
WATCHED_BPF_TYPES = frozenset({
    "kprobe", "tracepoint", "raw_tracepoint", "raw_tracepoint_writable", "perf_event",
    "tracing", "lsm", "ext", "struct_ops", "xdp", "sched_cls", "sched_act", "netfilter",
    "sk_skb", "sk_msg", "flow_dissector", "lwt_in", "lwt_out", "lwt_xmit", "lwt_seg6local"})
#: Helpers that let a program rewrite user memory or a kernel function's result.
DANGEROUS_BPF_HELPERS = frozenset({"bpf_probe_write_user", "bpf_override_return"})


class BpfCheck(Check):
    id: ClassVar[str] = "kernel.bpf"
    description: ClassVar[str] = (
        "Every loaded eBPF program that traces the kernel or sees packets is one the "
        "policy or the clean guest knows; none rewrites user memory or kernel results.")
    severity = Severity.HIGH
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        from vims.vmi.bpf import (
            kprobe_attachments,
            link_targets,
            loaded_programs,
            trace_event_attachments,
        )
        from vims.vmi.memory import MemoryReadError

        allow: list[str] = ctx.policy.get("bpf", {}).get("allow", [])
        clean_tags = {p["tag"] for p in (ctx.baseline or {}).get("bpf", [])}
        allowed_tags = {a.removeprefix("tag:").lower() for a in allow if a.startswith("tag:")}
        allowed_names = [a for a in allow if not a.startswith("tag:")]
        try:
            progs = loaded_programs(ctx.mem)
            if not progs:
                return []
            targets: dict[int, list[str]] = {}
            dispatchers = {ctx.mem.sym(n) for n in ("kprobe_dispatcher", "kretprobe_dispatcher")
                           if ctx.profile.has_symbol(n)}
            kprobes = [(kp.address, kp.addr) for kp in kprobe_state(ctx)
                       if any(f in dispatchers for _, f in kp.handlers)]
            for address, where in kprobe_attachments(ctx.mem, kprobes).items():
                targets.setdefault(address, []).extend(where)
            for link in link_targets(ctx.mem):
                if link.target:
                    targets.setdefault(link.prog, []).append(link.target)
            if any(p.type in {"tracepoint", "perf_event", "kprobe"} and p.address not in targets
                   for p in progs):
                for address, where in trace_event_attachments(ctx.mem).items():
                    targets.setdefault(address, []).extend(where)
        except (WalkError, MemoryReadError) as exc:
            raise CheckError(f"eBPF structures corrupt: {exc}") from exc
        out = []
        for prog in progs:
            prog.targets.extend(dict.fromkeys(targets.get(prog.address, [])))
            if prog.tag in allowed_tags or prog.tag in clean_tags:
                continue  # exactly the code the policy or the clean guest knows
            dangerous = sorted(DANGEROUS_BPF_HELPERS.intersection(prog.helpers))
            # A name vouches only for code whose helpers were all read: one past the
            # round's instruction budget could call anything.
            named = bool(prog.name) and prog.helpers_read and glob_any(prog.name,
                                                                       allowed_names)
            what = f"eBPF {prog.type} program {prog.name or '(unnamed)'} (id {prog.id}, " \
                   f"tag {prog.tag})" + (f" on {', '.join(prog.targets)}" if prog.targets else "")
            if dangerous:
                # A name is the loader's to choose: only the tag vouches for such code.
                out.append(self.finding(f"{what} calls {', '.join(dangerous)}",
                                        Severity.CRITICAL, **prog.public()))
            elif prog.type in WATCHED_BPF_TYPES and not named:
                out.append(self.finding(f"{what} is not one the policy or the clean guest "
                                        "knows", **prog.public()))
        return out


INET_HOOKS = ("pre_routing", "local_in", "forward", "local_out", "post_routing")
HOOK_NAMES = {"ipv4": INET_HOOKS, "ipv6": INET_HOOKS, "bridge": INET_HOOKS,
              "arp": ("in", "out", "forward"), "netdev": ("ingress", "egress")}


class NetfilterCheck(Check):
    id: ClassVar[str] = "kernel.netfilter"
    description: ClassVar[str] = (
        "Every netfilter hook of every network namespace and device lands in known code.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        from vims.vmi.netfilter import netfilter_hooks

        try:
            hooks = netfilter_hooks(ctx.mem)
        except WalkError as exc:
            raise CheckError(f"netfilter hooks corrupt: {exc}") from exc
        cmap = code_map(ctx)
        out = []
        for h in hooks:
            if cmap.known(h.func):
                continue
            names = HOOK_NAMES.get(h.family, ())
            point = names[h.hooknum] if h.hooknum < len(names) else str(h.hooknum)
            where = f"{h.family} {point}" + (f" on {h.device}" if h.device else "")
            out.append(self.finding(
                f"netfilter hook {where} (netns {h.netns}) runs 0x{h.func:x} in "
                f"{cmap.owner(h.func)}", netns=h.netns, family=h.family, hook=point,
                device=h.device or None, handler_symbol=symbolize(ctx, h.func),
                priv=f"0x{h.priv:x}", **cmap.handler(h.func)))
        return out


class CpuStateCheck(Check):
    id: ClassVar[str] = "cpu.state"
    description: ClassVar[str] = (
        "Each vCPU runs with CR0.WP, the clean guest's CR4 protections, the kernel's IDT and "
        "system-call entry.")
    severity = Severity.CRITICAL
    category = Category.HARDWARE
    needs_pause = False  # registers read from the hypervisor, in one request

    def run(self, ctx: Context) -> list[Finding]:
        from vims.vmi.cpu import CR0_WP, CR4_PROTECTIONS
        from vims.vmi.linux import xen_guest_type
        from vims.vmi.memory import MemoryReadError

        if xen_guest_type(ctx.mem) == "pv":
            raise NotApplicable("Xen PV domain: Xen owns its control registers, system-call "
                                "entry and trap table")
        vcpus = ctx.vcpus()
        if vcpus is None:
            raise NotApplicable("a memory snapshot has no vCPU state")
        clean: dict[str, bool] = (ctx.baseline or {}).get("cpu", {}).get("cr4", {})
        idt = ctx.mem.kv2p(ctx.mem.sym("idt_table"))
        entry = ctx.mem.sym("entry_SYSCALL_64") if ctx.profile.has_symbol(
            "entry_SYSCALL_64") else None
        out = []
        for v in vcpus:
            if not v.cr0 & CR0_WP:
                out.append(self.finding(
                    f"vCPU {v.cpu} runs with CR0.WP clear: the kernel can write read-only "
                    "memory", cpu=v.cpu, cr0=f"0x{v.cr0:x}"))
            for name, bit in CR4_PROTECTIONS.items():
                if clean.get(name) and not v.cr4 & bit:
                    out.append(self.finding(
                        f"vCPU {v.cpu} runs with CR4.{name.upper()} clear (set on the clean "
                        "guest)", cpu=v.cpu, cr4=f"0x{v.cr4:x}", protection=name))
            if v.idtr_base is not None:
                try:
                    where = ctx.mem.kv2p(v.idtr_base)
                except MemoryReadError:
                    where = -1
                if where != idt:
                    out.append(self.finding(
                        f"vCPU {v.cpu}'s IDTR points at 0x{v.idtr_base:x}, not at idt_table",
                        cpu=v.cpu, idtr=f"0x{v.idtr_base:x}",
                        idt_table=f"0x{ctx.mem.sym('idt_table'):x}"))
            if v.lstar is not None and entry is not None and v.lstar != entry:
                out.append(self.finding(
                    f"vCPU {v.cpu}'s MSR_LSTAR is {symbolize(ctx, v.lstar)}, not "
                    "entry_SYSCALL_64", cpu=v.cpu, lstar=f"0x{v.lstar:x}",
                    expected=f"0x{entry:x}"))
        return out
