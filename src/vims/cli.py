"""The ``vims`` command line.

Contract (scripts depend on it): one-line errors on stderr, exit status 2 for
errors; ``--format json`` wherever a command reports.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading

import click

from vims import __version__
from vims.errors import VimsError

# Command -> "module:attribute", imported only when that command runs: `vims check`
# in a Xen lab's dom0 (nested TCG) must not pay for the REM-S's web and SQL stack.
COMMANDS = {
    "lab": "vims.lab.cli:lab",
    "demo": "vims.demo:demo",
    "check": "vims.checks.cli:check",
    "baseline": "vims.checks.cli:baseline",
    "profile": "vims.vmi.cli:profile",
    "events": "vims.vmi.cli:events",
    "tpm": "vims.tpm.cli:tpm",
    "rems": "vims.rems.cli:rems",
    "avm": "vims.avm.cli:avm",
    "behaviour": "vims.trace.cli:behaviour",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vims")
def cli() -> None:
    """VIMS: attest the semantic integrity of virtual machines by introspection."""


# Signals (a timeout, Ansible or Molecule giving up, a hang-up) that end a command the
# way Ctrl-C does, so that its cleanup runs: a domain `vims check --domain` paused is
# resumed, an event monitor detaches from its vCPUs, a tracer removes its breakpoints,
# a half-booted lab is torn down. Killed outright (the default), each would leave a
# C-VM paused, hung or unattachable, or QEMU behind.
UNWIND = (signal.SIGTERM, signal.SIGHUP)


def main(argv: list[str] | None = None) -> int:
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in UNWIND}
    try:
        return _run(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="vims", standalone_mode=False)
    except VimsError as exc:
        click.echo(f"vims: error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("vims: error: interrupted", err=True)
        return 2
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("vims: error: interrupted", err=True)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
