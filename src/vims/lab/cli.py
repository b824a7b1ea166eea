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
@click.option("--memory", default="512M", show_default=True, help="Guest RAM (256M-3G).")
@click.option("--no-kaslr", is_flag=True, help="Boot with KASLR off.")
@click.option("--http-port", type=int, default=None, help="Host port for the guest's httpd.")
@click.option("--churn", is_flag=True, help="Start with the process-churn generator on.")
@click.option("--accel", type=click.Choice(["auto", "tcg", "kvm"]), default="auto",
              show_default=True, help="KVM only where it really works; else TCG.")
@click.option("--kernel", type=click.Path(path_type=Path), default=None,
              help="Boot this bzImage instead of the cached Debian kernel (needs --initrd).")
@click.option("--initrd", type=click.Path(path_type=Path), default=None, help="Initramfs to boot.")
@click.option("--timeout", type=float, default=180.0, show_default=True,
              help="Seconds to wait for the ready line.")
@FORMAT
def up(name: str, memory: str, no_kaslr: bool, http_port: int | None, churn: bool, accel: str,
       kernel: Path | None, initrd: Path | None, timeout: float, fmt: str) -> None:
    """Boot a lab C-VM and wait until its workload is ready."""
    spec = LabSpec(name=name, memory=parse_size(memory), kaslr=not no_kaslr, http_port=http_port,
                   kernel=kernel, initrd=initrd, accel=accel, churn=churn, boot_timeout=timeout)
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
@FORMAT
def exec_(name: str, command: tuple[str, ...], timeout: float, fmt: str) -> None:
    """Run a shell command in the guest (vims lab exec N -- CMD); exit with its status."""
    result = LabManager().exec(name, " ".join(command), timeout=timeout)
    if fmt == "json":
        _print({"stdout": result.stdout, "stderr": result.stderr,
                "exit_code": result.exit_code}, fmt, "")
    else:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    sys.exit(result.exit_code)


@lab.command()
@click.argument("name")
def pause(name: str) -> None:
    """Stop the guest's vCPUs (QMP stop)."""
    LabManager().pause(name)
    click.echo(f"lab '{name}' paused")


@lab.command()
@click.argument("name")
def resume(name: str) -> None:
    """Resume the guest's vCPUs (QMP cont)."""
    LabManager().resume(name)
    click.echo(f"lab '{name}' running")


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
