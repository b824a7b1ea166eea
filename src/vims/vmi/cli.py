"""``vims profile``: build a kernel's OS profile (and a Volatility ISF) from its image."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from vims.errors import VimsError
from vims.ui import note, step
from vims.vmi.isf import write_isf
from vims.vmi.profile import Profile, analyze_kernel

FORMAT = click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="Output for people or for scripts.",
)


@click.group()
def profile() -> None:
    """OS profiles: symbols and type layouts of a kernel, from its own image (BTF + kallsyms)."""


@profile.command()
@click.option("--kernel", "kernel", type=click.Path(path_type=Path, dir_okay=False),
              required=True, help="The bzImage (vmlinuz) the C-VM boots, or a vmlinux ELF.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Profile to write (JSON).")
@click.option("--isf", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write a Volatility 3 symbol table (.json, .json.xz or .json.gz).")
@FORMAT
def build(kernel: Path, out: Path, isf: Path | None, fmt: str) -> None:
    """Build the profile of KERNEL: no debug package, no running guest needed."""
    start = time.monotonic()
    analysis = analyze_kernel(kernel, step)
    with step("laying out types and kernel facts"):
        built = Profile.from_analysis(analysis)
    with step(f"writing {out}"):
        built.save(out)
    isf_counts: dict[str, int] = {}
    if isf is not None:
        with step(f"writing Volatility ISF {isf}"):
            isf_counts = write_isf(analysis, isf)
    took = round(time.monotonic() - start, 2)
    profile_bytes = out.stat().st_size
    summary: dict[str, object] = {
        "profile": str(out),
        "profile_bytes": profile_bytes,
        "release": built.release,
        "build_id": built.build_id,
        "symbols": len(built.symbols),
        "kallsyms_entries": len(analysis.kallsyms),
        "types": len(built.struct_names()),
        "enums": len(analysis.btf.enum_names()),
        "nr_syscalls": built.nr_syscalls,
        "source_format": analysis.extracted.source_format,
        "seconds": took,
    }
    if isf is not None:
        summary["isf"] = str(isf)
        summary["isf_bytes"] = isf_counts["bytes"]
    if fmt == "json":
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    click.echo("\n".join([
        f"profile    {out} ({profile_bytes >> 10} KiB)",
        f"kernel     {built.release} (build-id {built.build_id})",
        f"symbols    {summary['symbols']} ({summary['kallsyms_entries']} kallsyms entries)",
        f"types      {summary['types']} structs/unions, {summary['enums']} enums",
        f"syscalls   {built.nr_syscalls}",
        *([f"isf        {isf} ({isf_counts['bytes'] >> 10} KiB)"] if isf else []),
        f"took       {took} s",
    ]))


@click.group()
def events() -> None:
    """Hypervisor events on a live domain (LibVMI; Xen HVM/PVH domains, from dom0)."""


@events.command("cr3")
@click.option("--domain", required=True, help="Live domain name.")
@click.option("--seconds", type=click.FloatRange(0.1, 600), default=5.0, show_default=True,
              help="How long to monitor.")
@click.option("--mode", type=click.Choice(["xen", "kvm"]), default="xen", show_default=True)
@click.option("--cross-view", is_flag=True,
              help="Name the address spaces that ran and report those no listed task owns "
                   "(hidden processes); needs --profile. Exit status 1 when one is found.")
@click.option("--profile", "profile_path", type=click.Path(exists=True, dir_okay=False,
                                                          path_type=Path),
              help="The domain kernel's profile (vims profile build), for --cross-view.")
@FORMAT
def cr3(domain: str, seconds: float, mode: str, cross_view: bool, profile_path: Path | None,
        fmt: str) -> None:
    """Count the domain's CR3 writes (address-space switches) for a while."""
    from vims.vmi.events import measure_cr3

    if cross_view != (profile_path is not None):
        raise click.UsageError("--cross-view and --profile go together")
    with contextlib.ExitStack() as stack:
        view = None
        if profile_path is not None:
            from vims.vmi.crossview import Cr3CrossView
            from vims.vmi.memory import GuestMemory

            mem = stack.enter_context(GuestMemory(Profile.load(profile_path), domain=domain,
                                                  mode=mode))
            view = Cr3CrossView(mem)
        stats = measure_cr3(domain, seconds, mode, observer=view, on_attached=lambda: note(
            f"monitoring {domain}'s CR3 writes for {seconds:g} s")).public()
        if view is not None:
            stats["cross_view"] = view.finish().public()
    if fmt == "json":
        click.echo(json.dumps(stats, indent=2))
    else:
        click.echo(f"{domain}: {stats['events']} CR3 writes in {stats['seconds']} s "
                   f"({stats['events_per_second']}/s), {stats['distinct_roots']} distinct "
                   f"page-table roots, handler {stats['handler_us_per_event']} us/event")
        if "cross_view" in stats:
            cv = stats["cross_view"]
            click.echo(f"address spaces: {cv['address_spaces']} ({cv['listed']} of listed "
                       f"tasks, {cv['exited']} exited), hidden: {len(cv['hidden'])}; "
                       f"switches to kernel tables {cv['kernel_switches']}, unattributed "
                       f"{cv['unattributed_switches']}")
            for h in cv["hidden"]:
                click.echo(f"  HIDDEN pid {h['pid']} ({h['comm']}) cr3 {h['cr3']}: ran "
                           f"{h['switches']} times, no listed task owns its mm {h['mm']}")
    if stats["interrupted"]:
        # The counts so far are printed; the status still says the window was cut short.
        raise VimsError(f"interrupted by {stats['interrupted']} after {stats['seconds']} s; "
                        f"the monitor detached and {domain} runs on")
    if stats.get("cross_view", {}).get("hidden"):
        sys.exit(1)  # like vims check: 1 = findings
