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

from vims.baseline import clean_guest_state, load_image_files, new_baseline
from vims.baseline import save as save_baseline
from vims.checks.cli import render_table
from vims.checks.runner import run_round
from vims.lab import Lab, LabManager, LabSpec
from vims.paths import cache_dir
from vims.vmi.linux import Linux
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile, ProfileError, build_profile
from vims.vmi.vmcoreinfo import scan_file

GETPID = 39


def lab_profile(lab: Lab, out: Console) -> Profile:
    """The lab kernel's profile, built once and cached by kernel image."""
    cached = cache_dir() / "profiles" / f"{Path(lab.kernel).parent.name}.json"
    if cached.is_file():
        try:
            return Profile.load(cached)
        except ProfileError:
            pass  # an older format: build it again
    start = time.perf_counter()
    profile = build_profile(Path(lab.kernel))
    cached.parent.mkdir(parents=True, exist_ok=True)
    profile.save(cached)
    out.print(f"profile built from {lab.kernel} in {time.perf_counter() - start:.1f} s "
              f"({len(profile.symbols)} symbols, build-id {profile.build_id[:12]}…)")
    return profile


def clean_baseline(lab: Lab, mem: GuestMemory) -> dict[str, Any]:
    data = new_baseline(mem.profile)
    data["executables"] = load_image_files(Path(lab.initrd), None)
    with mem.paused():
        data.update(clean_guest_state(mem))
    save_baseline(data, cache_dir() / "demo-baseline.json")  # for `vims check` by hand
    return data


@click.command()
@click.option("--name", default="demo", show_default=True, help="Lab name to use.")
@click.option("--keep", is_flag=True, help="Leave the lab running afterwards.")
@click.option("--gate/--no-gate", default=True, show_default=True,
              help="Also run REM-S, A-VM agent and nginx gate end to end.")
def demo(name: str, keep: bool, gate: bool) -> None:
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
        if gate:
            out.rule("[bold]4. attestation: REM-S + A-VM (vTPM) + nginx gate")
            attest_and_gate(out, mgr, lab, profile)
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


def attest_and_gate(out: Console, mgr: LabManager, lab: Lab, profile: Profile) -> None:
    """REM-S and A-VM as processes, the agent's own swtpm, the C-VM behind a real nginx."""
    import shutil
    import tempfile

    from vims.checks import DEFAULT_CHECKS
    from vims.gate.nginx import GateRoute, NginxGate
    from vims.lab.deploy import deploy
    from vims.net import free_port

    work = Path(tempfile.mkdtemp(prefix="vims-demo-"))
    content = work / "intranet"
    content.mkdir()
    (content / "index.html").write_text("intranet: quarterly payroll\n")
    for p in (work, content):
        p.chmod(0o755)
    (content / "index.html").chmod(0o644)
    profile_path = cache_dir() / "profiles" / f"{Path(lab.kernel).parent.name}.json"
    policy_path = Path(str(resources.files("vims.lab") / "policy.json"))
    dep = deploy(work / "vims", ram=Path(lab.ram_path), profile=profile_path,
                 baseline=cache_dir() / "demo-baseline.json", local_policy=policy_path)
    nginx = NginxGate(work / "gate")
    port = free_port()
    try:
        dep.start_rems()
        policy = {"checks": [{"id": c, "interval_s": 2} for c in DEFAULT_CHECKS],
                  "stale_after_intervals": 3, "quote_every": 3}
        dep.put("/v1/policies/lab", json.dumps(policy).encode())
        dep.put(f"/v1/cvms/{dep.cvm}/policy", b'{"policy": "lab"}')
        nginx.configure([GateRoute(dep.cvm, f"127.0.0.1:{port}")], dep.gate_url, content)
        nginx.start(wait_url=f"http://127.0.0.1:{port}/")
        dep.start_avm()
        out.print(f"REM-S {dep.http_url} (status page /), A-VM enrolled (EK chain, "
                  f"MakeCredential), gate 127.0.0.1:{port} -> 10.0.2.2:{port} in the C-VM")

        def fetch() -> bool:
            r = mgr.exec(lab.name, f"vims-fetch 10.0.2.2 {port} /", timeout=15)
            return r.exit_code == 0

        def until(want: bool, limit: float) -> float:
            start = time.monotonic()
            while time.monotonic() - start < limit:
                if fetch() == want:
                    return time.monotonic() - start
                time.sleep(0.3)
            return -1.0

        took = until(True, 60)
        out.print(f"C-VM fetches the intranet page: [green]allowed[/green] "
                  f"(after {took:.1f} s: attestation + first report)")
        with GuestMemory(profile, path=Path(lab.ram_path)) as mem:
            slot = mem.sym("sys_call_table") + 246 * 8  # kexec_load: never called here
            original = mem.read(slot, 8)
            with mgr.paused(lab.name):
                mem.write(slot, mem.read(mem.sym("sys_call_table") + 39 * 8, 8))
            took = until(False, 10)
            out.print(f"rootkit hooks kexec_load: [red]denied[/red] after {took:.1f} s "
                      f"(decision {dep.decision()})")
            with mgr.paused(lab.name):
                mem.write(slot, original)
        took = until(True, 15)
        out.print(f"hook removed: [green]allowed[/green] again after {took:.1f} s")
        status, raw = dep.call("GET", "/v1/cvms", b"")
        if status == 200:
            for row in json.loads(raw):
                vector = ", ".join(f"{k}={v}" for k, v in row["vector"].items() if v)
                out.print(f"verdict {row['cvm']}: {row['status']} ({vector}); "
                          f"gate {'allows' if row['allowed'] else 'denies'}")
    finally:
        nginx.stop()
        dep.close()
        shutil.rmtree(work, ignore_errors=True)
