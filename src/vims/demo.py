"""``vims demo``: the README's main job on the one-machine lab.

Boots the lab C-VM, builds its OS profile (from the kernel image itself) and a
clean baseline, and runs every check from outside the guest. Then it plays a
rootkit from the host — a hooked system call and a process unlinked from the
task list, written into the guest's RAM while it is paused — shows what the
checks find, undoes the attack and checks again. The lab is torn down at the
end unless ``--keep`` is given.
"""

from __future__ import annotations

import json
import struct
import time
from importlib import resources
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from vims.baseline import BASELINE_FORMAT, load_image_files
from vims.baseline import save as save_baseline
from vims.checks.base import Context
from vims.checks.cli import render_table
from vims.checks.kernel import read_idt
from vims.checks.runner import run_round
from vims.lab import Lab, LabManager, LabSpec
from vims.paths import cache_dir
from vims.vmi.ktext import encode_text, normalized_text
from vims.vmi.linux import Linux
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile, build_profile
from vims.vmi.vmcoreinfo import scan_file

GETPID = 39


def lab_profile(lab: Lab, out: Console) -> Profile:
    """The lab kernel's profile, built once and cached by kernel image."""
    cached = cache_dir() / "profiles" / f"{Path(lab.kernel).parent.name}.json"
    if cached.is_file():
        return Profile.load(cached)
    start = time.perf_counter()
    profile = build_profile(Path(lab.kernel))
    cached.parent.mkdir(parents=True, exist_ok=True)
    profile.save(cached)
    out.print(f"profile built from {lab.kernel} in {time.perf_counter() - start:.1f} s "
              f"({len(profile.symbols)} symbols, build-id {profile.build_id[:12]}…)")
    return profile


def clean_baseline(lab: Lab, mem: GuestMemory) -> dict[str, Any]:
    with mem.paused():
        slide = mem.kaslr_offset
        data: dict[str, Any] = {
            "format": BASELINE_FORMAT,
            "kernel": {"release": mem.profile.release, "build_id": mem.profile.build_id},
            "executables": load_image_files(Path(lab.initrd), None),
            "idt": [a - slide if a else 0 for a in read_idt(Context(mem))],
            "modules": {m.name: {"size": m.size} for m in Linux(mem).modules()},
            "kernel_text": encode_text(normalized_text(mem)),
        }
    save_baseline(data, cache_dir() / "demo-baseline.json")  # for `vims check` by hand
    return data


@click.command()
@click.option("--name", default="demo", show_default=True, help="Lab name to use.")
@click.option("--keep", is_flag=True, help="Leave the lab running afterwards.")
def demo(name: str, keep: bool) -> None:
    """Boot the lab C-VM, attest it from outside, attack it, attest again."""
    out = Console(highlight=False)
    mgr = LabManager()
    lab = mgr.up(LabSpec(name=name))
    try:
        out.rule(f"[bold]lab C-VM '{lab.name}'")
        out.print(f"booted in {lab.ready_seconds} s under {lab.accel.upper()}; "
                  f"RAM file {lab.ram_path} ({lab.memory >> 20} MiB)")
        notes = scan_file(Path(lab.ram_path))
        if notes:
            out.print(f"VMCOREINFO in its RAM: kernel {notes[0].release}, "
                      f"KASLR offset 0x{notes[0].kaslr_offset or 0:x}")
        profile = lab_profile(lab, out)
        policy = json.loads((resources.files("vims.lab") / "policy.json").read_text())
        with GuestMemory(profile, path=Path(lab.ram_path),
                         pauser=lambda: mgr.paused(lab.name)) as mem:
            baseline = clean_baseline(lab, mem)
            target = {"memory": lab.ram_path}

            out.rule("[bold]1. clean C-VM")
            report = run_round(mem, [], baseline, policy, "auto", target)
            click.echo(render_table(report), nl=False)
            show_processes(out, report)

            out.rule("[bold]2. rootkit: hook getpid, hide a process (host writes guest RAM)")
            mgr.exec(lab.name, "sleep 31337 >/dev/null 2>&1 &")
            with mgr.paused(lab.name):
                mem.flush()
                attacked = attack_and_check(mem, baseline, policy, target)
            click.echo(render_table(attacked), nl=False)
            for f in attacked["findings"]:
                out.print(f"  [red]finding[/red] {f['check']}: {f['summary']}")

            out.rule("[bold]3. attack undone")
            report = run_round(mem, [], baseline, policy, "auto", target)
            click.echo(render_table(report), nl=False)
            mgr.exec(lab.name, "for p in $(pidof sleep); do grep -q 31337 /proc/$p/cmdline "
                               "&& kill $p; done; true")
        verdict = "clean C-VM passes, attacked C-VM fails" if (
            attacked["result"] == "fail" and report["result"] == "pass") else "UNEXPECTED"
        out.print(f"[bold]{verdict}[/bold]")
    finally:
        if not keep:
            mgr.down(lab.name)
            out.print(f"lab '{lab.name}' down")


def attack_and_check(mem: GuestMemory, baseline: dict[str, Any], policy: dict[str, Any],
                     target: dict[str, Any]) -> dict[str, Any]:
    """Apply the two attacks, run a round, and restore memory exactly."""
    table = mem.sym("sys_call_table")
    slot = table + GETPID * 8
    saved_slot = mem.read(slot, 8)
    victim = next(t for t in Linux(mem).tasks() if t.comm == "sleep")
    entry = victim.address + mem.profile.offset("task_struct", "tasks")
    nxt, prev = struct.unpack("<QQ", mem.read(entry, 16))
    try:
        mem.write(slot, mem.read(table, 8))  # getpid -> read's handler
        mem.write(prev, struct.pack("<Q", nxt))  # list_del: the task vanishes from ps
        mem.write(nxt + 8, struct.pack("<Q", prev))
        mem.write(entry, struct.pack("<QQ", entry, entry))
        return run_round(mem, [], baseline, policy, "none", target)
    finally:
        mem.write(entry, struct.pack("<QQ", nxt, prev))
        mem.write(prev, struct.pack("<Q", entry))
        mem.write(nxt + 8, struct.pack("<Q", entry))
        mem.write(slot, saved_slot)


def show_processes(out: Console, report: dict[str, Any]) -> None:
    table = Table(title="user processes seen from outside (semantic view)")
    for col in ("pid", "ppid", "comm", "exe", "uid"):
        table.add_column(col)
    for p in report["processes"]:
        if p["exe"]:
            table.add_row(str(p["pid"]), str(p["ppid"]), p["comm"], p["exe"], str(p["uid"]))
    out.print(table)
