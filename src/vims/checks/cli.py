"""``vims check`` and ``vims baseline build``."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vims import baseline as baseline_mod
from vims.checks.runner import exit_status, run_round, select_checks
from vims.errors import VimsError
from vims.vmi.cpu import VcpuState
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile
from vims.vmi.vmcoreinfo import scan_file

if TYPE_CHECKING:
    from vims.lab import LabManager


def _lab_of(ram: Path) -> tuple[LabManager, str] | None:
    """The running lab whose RAM file ``ram`` is (None for a snapshot)."""
    from vims.lab import LabManager

    mgr = LabManager()
    for lab in mgr.list():
        if Path(lab.ram_path).resolve() == ram.resolve():
            return mgr, lab.name
    return None


def lab_pauser(ram: Path) -> Callable[[], contextlib.AbstractContextManager[object]] | None:
    """QMP stop/cont when ``ram`` is the RAM file of a running lab; None for a snapshot."""
    found = _lab_of(ram)
    if found is None:
        return None
    mgr, name = found
    return lambda: mgr.paused(name)


def lab_vcpus(ram: Path) -> Callable[[], list[VcpuState]] | None:
    """The lab's vCPU state through QMP when ``ram`` is a running lab's RAM file."""
    found = _lab_of(ram)
    if found is None:
        return None
    mgr, name = found
    return lambda: mgr.vcpu_state(name)


def open_memory(profile: Profile, memory: Path | None, domain: str | None,
                mode: str = "xen") -> GuestMemory:
    """Open the C-VM's memory after checking the profile is for the kernel it runs."""
    if (memory is None) == (domain is None):
        raise VimsError("give exactly one of --memory RAM_FILE or --domain NAME")
    if memory is not None:
        if not memory.is_file():
            raise VimsError(f"memory file {memory} does not exist")
        notes = scan_file(memory)
        if notes:  # A guest could plant a fake note, but a mismatch is never benign.
            profile.check_matches(notes[0].build_id, notes[0].release)
        return GuestMemory(profile, path=memory, pauser=lab_pauser(memory),
                           vcpus=lab_vcpus(memory))
    from libvmi import Libvmi  # noqa: F401 - fail early with the import error

    return GuestMemory(profile, domain=domain, mode=mode)


def load_json_arg(path: Path | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise VimsError(f"{what} {path} does not exist") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise VimsError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise VimsError(f"{what} {path} must hold a JSON object")
    return data


def render_table(report: dict[str, Any]) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=io.StringIO(), record=True, width=110, force_terminal=False)
    target = report["target"].get("memory") or report["target"].get("domain")
    table = Table(title=f"vims check — {target} — {report['result'].upper()}")
    for col in ("check", "status", "ms", "findings / error"):
        table.add_column(col)
    for c in report["checks"]:
        detail = c["error"] or "; ".join(
            f["summary"] for f in report["findings"] if f["check"] == c["id"])[:200]
        table.add_row(c["id"], c["status"], f"{c['duration_ms']:.1f}", detail)
    console.print(table)
    console.print(f"{len(report['processes'])} processes, {len(report['modules'])} modules, "
                  f"round {report['duration_ms']:.1f} ms ({report['consistency']['mode']})")
    return console.export_text()


@click.command()
@click.option("--memory", type=click.Path(path_type=Path), help="Guest RAM file or snapshot.")
@click.option("--domain", help="Live domain name (LibVMI XEN/KVM driver).")
@click.option("--mode", type=click.Choice(["xen", "kvm"]), default="xen", show_default=True,
              help="LibVMI driver for --domain.")
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), required=True)
@click.option("--baseline", "baseline_path", type=click.Path(path_type=Path))
@click.option("--policy", "policy_path", type=click.Path(path_type=Path))
@click.option("--checks", "check_ids", help="Comma-separated check ids (default: all).")
@click.option("--consistency", type=click.Choice(["auto", "pause", "retry", "none"]),
              default="auto", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="table",
              show_default=True)
def check(memory: Path | None, domain: str | None, mode: str, profile_path: Path,
          baseline_path: Path | None, policy_path: Path | None, check_ids: str | None,
          consistency: str, fmt: str) -> None:
    """Run integrity checks on a C-VM. Exit 0 pass, 1 findings, 2 error."""
    ids = select_checks([c.strip() for c in check_ids.split(",")] if check_ids else None)
    profile = Profile.load(profile_path)
    base = baseline_mod.load(baseline_path) if baseline_path else None
    if base is not None:
        profile.check_matches(base["kernel"]["build_id"], base["kernel"]["release"])
    policy = load_json_arg(policy_path, "policy")
    with open_memory(profile, memory, domain, mode) as mem:
        target = {"memory": str(memory)} if memory else {"domain": domain}
        report = run_round(mem, ids, base, policy, consistency, target)
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_table(report), nl=False)
    sys.exit(exit_status(report))


@click.group()
def baseline() -> None:
    """Known-good baselines for a C-VM."""


@baseline.command("build")
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), required=True)
@click.option("--initramfs", type=click.Path(path_type=Path), help="Golden initramfs (cpio).")
@click.option("--rootfs", type=click.Path(path_type=Path), help="Golden root directory.")
@click.option("--memory", type=click.Path(path_type=Path),
              help="RAM of a clean guest: IDT, module sizes and kernel text pages.")
@click.option("--domain", help="A clean live domain instead of --memory (LibVMI XEN/KVM).")
@click.option("--mode", type=click.Choice(["xen", "kvm"]), default="xen", show_default=True,
              help="LibVMI driver for --domain.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def build(profile_path: Path, initramfs: Path | None, rootfs: Path | None,
          memory: Path | None, domain: str | None, mode: str, out: Path) -> None:
    """Build a baseline from a golden image and/or a clean guest's memory."""
    from vims import ui
    from vims.baseline import clean_guest_state, load_image_files, new_baseline, save

    if initramfs is not None and rootfs is not None:
        raise VimsError("give --initramfs or --rootfs, not both")
    if memory is not None and domain is not None:
        raise VimsError("give --memory or --domain, not both")
    if initramfs is None and rootfs is None and memory is None and domain is None:
        raise VimsError("nothing to baseline: give --initramfs/--rootfs and/or --memory/--domain")
    profile = Profile.load(profile_path)
    data = new_baseline(profile)
    with ui.step("hashing executables' text"):
        data["executables"] = load_image_files(initramfs, rootfs)
    if memory is not None or domain is not None:
        with ui.step("reading the clean guest's kernel state"), \
                open_memory(profile, memory, domain, mode) as mem, mem.paused():
            data.update(clean_guest_state(mem))
    save(data, out)
    click.echo(f"{out}: {len(data['executables'])} executables"
               + (f", {len(data['modules'])} modules, IDT, kernel text"
                  if memory or domain else ""))

