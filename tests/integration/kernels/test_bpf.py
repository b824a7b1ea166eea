"""eBPF rootkits on the real lab guest: programs loaded the way TripleCross, ebpfkit
and boopkit load theirs (raw ``bpf()``/``perf_event_open()``, tests/guest/bpfload.c)
and found by ``kernel.bpf`` with what ``bpftool prog`` would show: id, name, tag,
type, where it is attached and the helpers it calls.

None of these touches kernel text, the syscall table or a hook list the other
checks judge: the kprobe a program hangs off runs ``kprobe_dispatcher``, kernel
code. Without ``kernel.bpf`` a program rewriting getdents64 results passes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from tests.attacks import patched
from tests.conftest import findings_of, guest_tool, push, sh, start_bg, wait_for

from vims.baseline import load as load_baseline
from vims.checks.runner import run_round
from vims.lab import Lab, LabManager
from vims.vmi.memory import GuestMemory

pytestmark = [pytest.mark.lab, pytest.mark.slow]
LOADER = "/tmp/bpfload"
OTHER_CHECKS = ("kernel.text", "kernel.ftrace", "kernel.kprobes", "kernel.data",
                "kernel.syscall_table")


@pytest.fixture(scope="module")
def baseline(baseline_path: Path) -> dict[str, Any]:
    return load_baseline(baseline_path)


@pytest.fixture(scope="module")
def loader(lab_manager: LabManager, lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> str:
    push(lab_manager, lab, guest_tool("bpfload", tmp_path_factory.mktemp("guest-tools")), LOADER)
    return LOADER


def round_(mem: GuestMemory, baseline: dict[str, Any], policy: dict[str, Any],
           *ids: str) -> dict[str, Any]:
    return run_round(mem, list(ids), baseline, policy, "auto", {"memory": "lab"})


def bpf_findings(mem: GuestMemory, baseline: dict[str, Any],
                 policy: dict[str, Any]) -> list[dict[str, Any]]:
    return findings_of(round_(mem, baseline, policy, "kernel.bpf"), "kernel.bpf")


@contextmanager
def loaded(mgr: LabManager, lab: Lab, mem: GuestMemory, baseline: dict[str, Any],
           policy: dict[str, Any], *args: str) -> Iterator[dict[str, str]]:
    """Run the loader in the guest; yield what the guest's own fdinfo says of the program
    (prog_id, prog_tag), and wait for the program to be freed when the loader is killed."""
    mark = args[-2] if args[-1] == "write" else args[-1]  # the program name
    start_bg(mgr, lab, f"{LOADER} {' '.join(args)} > /tmp/bpfload.{mark}.log 2>&1",
             "bpfload", mark)
    pid = sh(mgr, lab, f"grep -l {mark} /proc/[0-9]*/cmdline | cut -d/ -f3").split()[0]
    wait_for(lambda: "loaded" in sh(mgr, lab, f"cat /tmp/bpfload.{mark}.log"), 10)
    fdinfo = sh(mgr, lab, f"cat /proc/{pid}/fdinfo/*")
    info = dict(re.findall(r"^(prog_tag|prog_id):\s*(\S+)$", fdinfo, re.M))
    assert info, fdinfo
    try:
        yield info
    finally:
        sh(mgr, lab, f"kill {pid}")
        wait_for(lambda: not any(f["evidence"]["name"] == mark
                                 for f in bpf_findings(mem, baseline, {})), 20, 0.5)


def test_a_kprobe_program_writing_user_memory_is_critical(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, loader: str,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    with loaded(lab_manager, lab, mem, baseline, policy,
                "kprobe", "__x64_sys_getdents64", "sys_hide", "write") as info:
        report = round_(mem, baseline, policy, "kernel.bpf", *OTHER_CHECKS)
    assert {c: findings_of(report, c) for c in OTHER_CHECKS} == {c: [] for c in OTHER_CHECKS}
    [hit] = findings_of(report, "kernel.bpf")
    ev = hit["evidence"]
    assert hit["severity"] == "critical"
    assert (ev["name"], ev["type"], ev["tag"], str(ev["id"])) == (
        "sys_hide", "kprobe", info["prog_tag"], info["prog_id"])
    assert ev["helpers"] == ["bpf_probe_write_user"]
    # (+0x4 on IBT kernels: a kprobe on a symbol lands past its ENDBR64)
    assert [t.split("+")[0] for t in ev["attached_to"]] == ["kprobe __x64_sys_getdents64"]
    assert ev["uid"] == 0
    assert ev["insns"] >= 8
    assert "calls bpf_probe_write_user" in hit["summary"]


def test_a_raw_tracepoint_program_is_found_and_a_policy_may_allow_it(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, loader: str,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    with loaded(lab_manager, lab, mem, baseline, policy,
                "rawtp", "sys_enter", "net_stats") as info:
        [hit] = bpf_findings(mem, baseline, policy)
        by_tag = bpf_findings(mem, baseline, {"bpf": {"allow": [f"tag:{info['prog_tag']}"]}})
        by_name = bpf_findings(mem, baseline, {"bpf": {"allow": ["net_*"]}})
        other_tag = bpf_findings(mem, baseline, {"bpf": {"allow": ["tag:0011223344556677"]}})
    ev = hit["evidence"]
    assert hit["severity"] == "high"
    assert (ev["type"], ev["attached_to"], ev["helpers"]) == (
        "raw_tracepoint", ["raw_tracepoint sys_enter"], ["bpf_get_current_pid_tgid"])
    assert by_tag == []
    assert by_name == []
    assert [f["evidence"]["tag"] for f in other_tag] == [info["prog_tag"]]


def test_a_name_does_not_vouch_for_a_program_that_writes_user_memory(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, loader: str,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    # A loader picks its program's name; a policy allowing "net_*" must not let one
    # that rewrites user memory through.
    with loaded(lab_manager, lab, mem, baseline, policy,
                "rawtp", "sys_exit", "net_mon", "write") as info:
        named = bpf_findings(mem, baseline, {"bpf": {"allow": ["net_*"]}})
        tagged = bpf_findings(mem, baseline, {"bpf": {"allow": [f"tag:{info['prog_tag']}"]}})
    assert [(f["severity"], f["evidence"]["name"]) for f in named] == [("critical", "net_mon")]
    assert tagged == []


def test_a_socket_filter_is_listed_not_judged(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, loader: str,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    # systemd and tcpdump load socket and cgroup programs on clean systems.
    from vims.vmi.bpf import loaded_programs

    with loaded(lab_manager, lab, mem, baseline, policy, "socket", "tcpdump_flt") as info:
        findings = bpf_findings(mem, baseline, policy)
        with lab_manager.paused(lab.name):
            progs = {p.name: p for p in loaded_programs(mem)}
    assert findings == []
    assert progs["tcpdump_flt"].type == "socket_filter"
    assert progs["tcpdump_flt"].tag == info["prog_tag"]


def test_a_corrupt_program_map_is_an_error_not_a_pass(
        lab_manager: LabManager, lab: Lab, mem: GuestMemory, loader: str,
        baseline: dict[str, Any], policy: dict[str, Any]) -> None:
    p = mem.profile
    head = mem.sym("prog_idr") + p.offset("idr", "idr_rt") + p.offset("xarray", "xa_head")
    with loaded(lab_manager, lab, mem, baseline, policy, "socket", "probe_a"), \
            lab_manager.paused(lab.name):
        # A head pointing at itself as a node (a cycle), then at user space.
        for bad in (head + 2, 0x0000_7fff_0000_0002):
            with patched(mem, head, bad.to_bytes(8, "little")):
                result = round_(mem, baseline, policy, "kernel.bpf")["checks"][0]
            assert result["status"] == "error", (bad, result)
            assert "eBPF structures corrupt" in result["error"]
            assert "\n" not in result["error"]
