"""``vims demo``: the README's main job on the one-machine lab.

Boots the lab C-VM, shows what the A-VM side can already see of it from
outside (its raw RAM), next to what the guest says of itself, then tears the
lab down unless ``--keep`` is given.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from vims.lab import LabManager, LabSpec
from vims.vmi.vmcoreinfo import scan_file


@click.command()
@click.option("--name", default="demo", show_default=True, help="Lab name to use.")
@click.option("--keep", is_flag=True, help="Leave the lab running afterwards.")
def demo(name: str, keep: bool) -> None:
    """Boot the lab C-VM and show what VIMS sees of it from outside."""
    out = Console(highlight=False)
    mgr = LabManager()
    lab = mgr.up(LabSpec(name=name))
    try:
        out.rule(f"[bold]lab C-VM '{lab.name}'")
        out.print(f"booted in {lab.ready_seconds} s under {lab.accel.upper()}; "
                  f"RAM file {lab.ram_path} ({lab.memory >> 20} MiB)")

        start = time.perf_counter()
        notes = scan_file(Path(lab.ram_path))
        took = (time.perf_counter() - start) * 1000
        table = Table(title="Seen from outside (raw guest RAM, no guest cooperation)")
        table.add_column("what")
        table.add_column("value")
        if notes:
            note = notes[0]
            table.add_row("VMCOREINFO note", f"phys 0x{note.phys_addr:x} ({len(notes)} copies)")
            table.add_row("kernel release", note.release)
            table.add_row("kernel build-id", note.build_id)
            table.add_row("KASLR offset", f"0x{note.kaslr_offset or 0:x}")
            stext = note.symbol("_stext")
            table.add_row("_stext", f"0x{stext:x}" if stext else "?")
        else:
            table.add_row("VMCOREINFO note", "not found")
        table.add_row("scan time", f"{took:.0f} ms over {lab.memory >> 20} MiB")
        out.print(table)

        uname = mgr.exec(lab.name, "uname -r").stdout.strip()
        ps = mgr.exec(lab.name, "ps").stdout.splitlines()[1:]
        with urllib.request.urlopen(f"http://127.0.0.1:{lab.http_port}/", timeout=30) as r:
            http = f"{r.status} ({len(r.read())} bytes)"
        inside = Table(title="What the guest says of itself (serial console)")
        inside.add_column("what")
        inside.add_column("value")
        inside.add_row("uname -r", uname)
        inside.add_row("processes (ps)", str(len(ps)))
        inside.add_row("user-space", ", ".join(sorted({
            row.split(None, 2)[2].split()[0] for row in ps if "[" not in row})))
        inside.add_row(f"GET :{lab.http_port}/", http)
        out.print(inside)
        agree = bool(notes) and notes[0].release == uname
        out.print(f"[bold]{'release agrees' if agree else 'release DIFFERS'}[/bold]: "
                  f"outside view {notes[0].release if notes else '?'} vs guest {uname}")
    finally:
        if not keep:
            mgr.down(lab.name)
            out.print(f"lab '{lab.name}' down")
