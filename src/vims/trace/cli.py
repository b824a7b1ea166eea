"""``vims behaviour``: trace, learn, check and show system-call behaviour models."""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from vims import ui
from vims.errors import VimsError
from vims.trace.model import Enforcer, Learner, Model, Violation
from vims.trace.tracer import SyscallEvent, SyscallTracer, TraceStats, app_globs
from vims.vmi.profile import Profile

MAX_SECONDS = 24 * 3600
MAX_REPORTED = 10_000


def parse_apps(values: tuple[str, ...]) -> dict[str, list[str]]:
    """``NAME`` or ``NAME=GLOB[,GLOB]`` -> {name: [globs]}."""
    out: dict[str, list[str]] = {}
    for value in values:
        name, _, globs = value.partition("=")
        if not name or not all(c.isalnum() or c in "._-" for c in name):
            raise VimsError(f"--app {value!r}: give NAME or NAME=GLOB[,GLOB]")
        out[name] = [g for g in globs.split(",") if g] or [name]
    return app_globs(out)


def target(lab: str | None, memory: Path | None, gdb: Path | None) -> tuple[Path, Path]:
    """The C-VM's RAM file and gdbstub socket, from a lab name or given directly."""
    if lab is not None:
        if memory is not None or gdb is not None:
            raise VimsError("give --lab, or --memory with --gdb, not both")
        from vims.lab import LabManager

        found = LabManager().get(lab)
        if not found.gdb_socket:
            raise VimsError(f"lab '{lab}' has no gdbstub (a Xen lab, or started by an older "
                            "vims): restart it with vims lab up")
        return Path(found.ram_path), Path(found.gdb_socket)
    if memory is None or gdb is None:
        raise VimsError("give --lab NAME, or --memory RAM_FILE with --gdb SOCKET")
    return memory, gdb


@contextlib.contextmanager
def tracing(profile_path: Path, ram: Path, gdb: Path, apps: dict[str, list[str]],
            on_event: Callable[[SyscallEvent], None], gate: bool) -> Iterator[SyscallTracer]:
    from vims.checks.cli import open_memory

    with open_memory(Profile.load(profile_path), ram, None) as mem:
        tracer = SyscallTracer(mem, gdb, apps, on_event, gate=gate)
        tracer.start()
        try:
            yield tracer
        finally:
            tracer.stop()


def run_for(tracer: SyscallTracer, seconds: float, workload: str | None) -> None:
    """Trace for ``seconds``, or until ``workload`` (a host command) exits, if given first."""
    if not 0 < seconds <= MAX_SECONDS:
        raise VimsError(f"--seconds must be in (0, {MAX_SECONDS}]")
    deadline = time.monotonic() + seconds
    proc = None
    if workload:
        proc = subprocess.Popen(shlex.split(workload), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() < deadline and tracer.alive:
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(10)
    if tracer.error:
        raise VimsError(f"tracing stopped: {tracer.error}")


def _stats_line(stats: TraceStats) -> str:
    return (f"{stats.events} system calls traced in {stats.seconds:.1f} s "
            f"({stats.stops} stops: {stats.syscall_stops} at system calls, "
            f"{stats.switch_stops} at switches; {stats.steps} single-steps)")


_target_options = [
    click.option("--lab", help="Lab C-VM name (its RAM file and gdbstub)."),
    click.option("--memory", type=click.Path(path_type=Path), help="C-VM RAM file."),
    click.option("--gdb", type=click.Path(path_type=Path), help="C-VM's QEMU gdbstub socket."),
    click.option("--profile", "profile_path", type=click.Path(path_type=Path), required=True),
    click.option("--seconds", type=float, default=30.0, show_default=True,
                 help="How long to trace."),
    click.option("--while", "workload",
                 help="Host command to run meanwhile; tracing ends when it exits."),
    click.option("--gate/--no-gate", default=False, show_default=True,
                 help="Stop at context switches and arm the system-call breakpoint only "
                      "while a monitored process runs."),
]


def target_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_target_options):
        f = option(f)
    return f


@click.group()
def behaviour() -> None:
    """System-call behaviour of C-VM applications, traced from outside (QEMU lab)."""


@behaviour.command("trace")
@target_options
@click.option("--app", "apps", multiple=True, required=True, help="NAME[=COMM_GLOB,...].")
def trace_cmd(lab: str | None, memory: Path | None, gdb: Path | None, profile_path: Path,
              seconds: float, workload: str | None, gate: bool, apps: tuple[str, ...]) -> None:
    """Print the system calls of the selected applications as JSON lines."""
    ram, sock = target(lab, memory, gdb)

    def show(event: SyscallEvent) -> None:
        sys.stdout.write(json.dumps(event.public()) + "\n")

    with tracing(profile_path, ram, sock, parse_apps(apps), show, gate) as tracer:
        run_for(tracer, seconds, workload)
    ui.note(_stats_line(tracer.stats))


@behaviour.command("learn")
@target_options
@click.option("--app", "apps", multiple=True, required=True, help="NAME[=COMM_GLOB,...].")
@click.option("--ngram", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--generalise", type=click.IntRange(0, 1000), default=3, show_default=True,
              help="Fold a directory's files into DIR/* once this many were opened (0: never).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def learn(lab: str | None, memory: Path | None, gdb: Path | None, profile_path: Path,
          seconds: float, workload: str | None, gate: bool, apps: tuple[str, ...], ngram: int,
          generalise: int, out: Path, fmt: str) -> None:
    """Record a clean run of the applications into a behaviour model."""
    ram, sock = target(lab, memory, gdb)
    selected = parse_apps(apps)
    learner = Learner(selected, ngram, generalise)
    with ui.step(f"learning {', '.join(selected)} for up to {seconds:g} s"), \
            tracing(profile_path, ram, sock, selected, learner.feed, gate) as tracer:
        run_for(tracer, seconds, workload)
    profile = Profile.load(profile_path)
    model = learner.model(kernel=profile.release, training={
        "events": learner.events, "seconds": round(tracer.stats.seconds, 1),
        "workload": workload or ""})
    model.save(out)
    summary = {"model": str(out), "digest": model.digest, **_app_counts(model),
               "stats": tracer.stats.public()}
    if fmt == "json":
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"{out}: {model.digest}\n{_stats_line(tracer.stats)}")
        for app, counts in summary["apps"].items():
            click.echo(f"  {app}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


def _app_counts(model: Model) -> dict[str, Any]:
    return {"apps": {a: {"syscalls": len(m.syscalls), "ngrams": len(m.ngrams),
                         "exec": len(m.exec), "open": len(m.open), "connect": len(m.connect),
                         "bind": len(m.bind)} for a, m in model.apps.items()}}


@behaviour.command("check")
@target_options
@click.option("--model", "model_path", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def check_cmd(lab: str | None, memory: Path | None, gdb: Path | None, profile_path: Path,
              seconds: float, workload: str | None, gate: bool, model_path: Path,
              fmt: str) -> None:
    """Trace the model's applications and report what it never saw. Exit 1 on violations."""
    ram, sock = target(lab, memory, gdb)
    model = Model.load(model_path)
    enforcer = Enforcer(model)
    violations: list[Violation] = []

    def feed(event: SyscallEvent) -> None:
        found = enforcer.feed(event)
        if len(violations) < MAX_REPORTED:
            violations.extend(found[:MAX_REPORTED - len(violations)])

    with tracing(profile_path, ram, sock, enforcer.apps, feed, gate) as tracer:
        run_for(tracer, seconds, workload)
    if fmt == "json":
        click.echo(json.dumps({"model": model.digest, "violations": [v.public() for v in
                                                                     violations],
                               "stats": tracer.stats.public()}, indent=2))
    else:
        click.echo(f"{model_path} ({model.digest}): {len(violations)} violations; "
                   + _stats_line(tracer.stats))
        for v in violations:
            click.echo(f"  {v.summary()}")
    sys.exit(1 if violations else 0)


@behaviour.command("show")
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def show_cmd(model_path: Path, fmt: str) -> None:
    """Summarise a model: its digest (what a policy names) and what it allows."""
    model = Model.load(model_path)
    if fmt == "json":
        click.echo(json.dumps({"digest": model.digest, "n": model.n, "kernel": model.kernel,
                               "training": model.training, **_app_counts(model)}, indent=2))
        return
    click.echo(f"{model_path}: {model.digest}\n{model.n}-grams, kernel {model.kernel or '?'}, "
               f"training {model.training}")
    for app, m in model.apps.items():
        click.echo(f"  {app} (comm {', '.join(m.comm)}): {len(m.syscalls)} calls, "
                   f"{len(m.ngrams)} {model.n}-grams")
        for kind in ("exec", "open", "connect", "bind"):
            items = getattr(m, kind)
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                click.echo(f"    {kind}: {', '.join(items[:8])}{more}")
