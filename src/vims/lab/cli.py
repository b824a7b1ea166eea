"""``vims lab``: drive lab C-VMs from the shell."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from vims.errors import LabError
from vims.lab.manager import Lab, LabManager, LabSpec, parse_size

FORMAT = click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="Output for people or for scripts.",
)


def _describe(lab: Lab) -> str:
    if lab.hypervisor == "xen":
        lines = [
            f"lab        {lab.name} (Xen 4.17 + dom0 under QEMU {lab.accel.upper()}, {lab.state}, "
            f"pid {lab.pid})",
            f"dom0       console {lab.serial_socket} (log {lab.serial_log})",
            f"ssh        ssh -i {lab.ssh_key} -p {lab.ssh_port} root@127.0.0.1",
            f"share      {lab.share_dir} (/vims in dom0)",
        ]
        for d in lab.domains:
            lines.append(f"C-VM       domain {d['name']} (id {d['domid']}, {d['type'].upper()}, "
                         f"{d['memory_mb']} MiB, {lab.kernel_release}) "
                         f"console {d['console_socket']}")
        return "\n".join(lines)
    return "\n".join([
        f"lab        {lab.name} ({lab.state}, pid {lab.pid}, {lab.accel.upper()})",
        f"kernel     {lab.kernel} ({lab.kernel_release}, KASLR {'on' if lab.kaslr else 'off'})",
        f"ram        {lab.ram_path} ({lab.memory >> 20} MiB)",
        f"qmp        {lab.qmp_socket}",
        f"console    {lab.serial_socket} (log {lab.serial_log})",
        f"httpd      http://127.0.0.1:{lab.http_port}/",
    ])


def _print(data: object, fmt: str, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if fmt == "json" else text)


@click.group()
def lab() -> None:
    """Lab C-VMs: a Debian kernel with a busybox workload under QEMU, RAM in a shared file."""


@lab.command()
@click.option("--name", default="cvm", show_default=True, help="Lab name (a-z, 0-9, '-').")
@click.option("--memory", default=None,
              help="Guest RAM (256M-3G; default 512M, 256M per domain on Xen).")
@click.option("--no-kaslr", is_flag=True, help="Boot with KASLR off.")
@click.option("--http-port", type=int, default=None, help="Host port for the guest's httpd.")
@click.option("--churn", is_flag=True, help="Start with the process-churn generator on.")
@click.option("--accel", type=click.Choice(["auto", "tcg", "kvm"]), default="auto",
              show_default=True, help="KVM only where it really works; else TCG.")
@click.option("--kernel", type=click.Path(path_type=Path), default=None,
              help="Boot this bzImage instead of the cached Debian kernel (needs --initrd).")
@click.option("--initrd", type=click.Path(path_type=Path), default=None, help="Initramfs to boot.")
@click.option("--kernel-package", default=None, metavar="PACKAGE",
              help="Debian kernel package to fetch and boot, e.g. linux-image-6.12-amd64 "
                   "(default: what linux-image-amd64 depends on).")
@click.option("--timeout", type=float, default=None,
              help="Seconds to wait for each ready line (default 180; 600 on Xen).")
@click.option("--hypervisor", type=click.Choice(["qemu", "xen"]), default="qemu",
              show_default=True,
              help="qemu: the C-VM is a QEMU guest. xen: Xen 4.17 + dom0 under QEMU, "
                   "C-VMs as domUs.")
@click.option("--cvms", type=click.IntRange(1, 4), default=1, show_default=True,
              help="Xen: C-VM domains to create (cvm1..cvmN).")
@click.option("--domu-type", default="pv", show_default=True,
              help="Xen: pv or pvh C-VM domains; a list (pv,pvh) mixes them in turn.")
@FORMAT
def up(name: str, memory: str | None, no_kaslr: bool, http_port: int | None, churn: bool,
       accel: str, kernel: Path | None, initrd: Path | None, kernel_package: str | None,
       timeout: float | None,
       hypervisor: str, cvms: int, domu_type: str, fmt: str) -> None:
    """Boot a lab C-VM and wait until its workload is ready."""
    xen = hypervisor == "xen"
    if xen:
        from vims.lab.xen import domu_types

        domu_types(domu_type)  # a bad value is a usage error before anything boots
    if not xen and (cvms != 1 or domu_type != "pv"):
        raise click.UsageError("--cvms and --domu-type need --hypervisor xen")
    if xen and (kernel or initrd or kernel_package or http_port or churn or no_kaslr
                or accel != "auto"):
        raise click.UsageError("--hypervisor xen boots the lab kernel under TCG; it takes no "
                               "--kernel/--initrd/--kernel-package/--http-port/--churn/"
                               "--no-kaslr/--accel")
    if kernel and kernel_package:
        raise click.UsageError("--kernel and --kernel-package exclude each other")
    spec = LabSpec(name=name, memory=parse_size(memory or ("256M" if xen else "512M")),
                   kaslr=not no_kaslr, http_port=http_port, kernel=kernel, initrd=initrd,
                   kernel_package=kernel_package, accel=accel, churn=churn,
                   boot_timeout=timeout or (600.0 if xen else 180.0),
                   hypervisor=hypervisor, cvms=cvms, domu_type=domu_type)
    booted = LabManager().up(spec)
    _print(booted.to_public(), fmt, _describe(booted) + f"\nready in   {booted.ready_seconds} s")


@lab.command()
@click.argument("name", required=False)
@FORMAT
def status(name: str | None, fmt: str) -> None:
    """Show one lab, or all of them."""
    mgr = LabManager()
    labs = [mgr.get(name)] if name else mgr.list()
    text = "\n\n".join(_describe(x) for x in labs) or "no labs running"
    _print([x.to_public() for x in labs], fmt, text)


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=float, default=30.0, show_default=True)
@click.option("--dom0", is_flag=True, help="Xen lab: run in dom0 (over its serial console).")
@click.option("--domain", default=None, help="Xen lab: the C-VM domain (default: the first).")
@FORMAT
def exec_(name: str, command: tuple[str, ...], timeout: float, dom0: bool, domain: str | None,
          fmt: str) -> None:
    """Run a shell command in the guest (vims lab exec N -- CMD); exit with its status."""
    if dom0 and domain:
        raise click.UsageError("give --dom0 or --domain, not both")
    result = LabManager().exec(name, " ".join(command), timeout=timeout, dom0=dom0,
                               domain=domain)
    if fmt == "json":
        _print({"stdout": result.stdout, "stderr": result.stderr,
                "exit_code": result.exit_code}, fmt, "")
    else:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    sys.exit(result.exit_code)


@lab.command()
@click.argument("name")
@click.option("--domain", default=None, help="Xen lab: one C-VM domain (default: all).")
def pause(name: str, domain: str | None) -> None:
    """Stop the guest's vCPUs (QMP stop; xl pause on a Xen lab)."""
    LabManager().pause(name, domain)
    click.echo(f"lab '{name}' paused")


@lab.command()
@click.argument("name")
@click.option("--domain", default=None, help="Xen lab: one C-VM domain (default: all).")
def resume(name: str, domain: str | None) -> None:
    """Resume the guest's vCPUs (QMP cont; xl unpause on a Xen lab)."""
    LabManager().resume(name, domain)
    click.echo(f"lab '{name}' running")


@lab.command()
@click.argument("name")
@click.option("--domain", required=True, help="The C-VM domain to create afresh.")
def recreate(name: str, domain: str) -> None:
    """Xen lab: destroy a C-VM domain (crashed, hung) and create it again."""
    lab = LabManager().recreate_domain(name, domain)
    dom = LabManager.domain(lab, domain)
    click.echo(f"C-VM domain {domain} of lab '{name}' recreated (id {dom['domid']}, "
               f"ready in {dom['ready_seconds']} s)")


@lab.command()
@click.argument("name")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="File for the raw physical memory.")
@FORMAT
def snapshot(name: str, out: Path, fmt: str) -> None:
    """Save the guest's raw physical memory, taken while paused."""
    start = time.monotonic()
    size = LabManager().snapshot(name, out)
    took = time.monotonic() - start
    _print({"path": str(out), "bytes": size, "seconds": round(took, 3)}, fmt,
           f"{out}: {size} bytes in {took:.2f} s")


@lab.command()
@click.argument("name")
@click.argument("state", type=click.Choice(["on", "off"]))
def churn(name: str, state: str) -> None:
    """Switch the guest's process-churn generator on or off."""
    cmd = "touch /run/churn" if state == "on" else "rm -f /run/churn"
    if LabManager().exec(name, cmd).exit_code != 0:
        raise LabError(f"could not switch churn {state}")
    click.echo(f"lab '{name}': churn {state}")


@lab.command()
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Stop every lab.")
def down(name: str | None, all_: bool) -> None:
    """Stop a lab and remove its RAM file, sockets and state."""
    mgr = LabManager()
    if all_ == bool(name):
        raise click.UsageError("give a lab NAME or --all")
    names = mgr.names() if all_ else [name or ""]
    for n in names:
        if mgr.down(n):
            click.echo(f"lab '{n}' down")
        elif not all_:
            raise LabError(f"no lab named '{n}'")
