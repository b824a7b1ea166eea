"""The ``vims`` command line.

Contract (scripts depend on it): one-line errors on stderr, exit status 2 for
errors; ``--format json`` wherever a command reports.
"""

from __future__ import annotations

import sys

import click

from vims import __version__
from vims.avm.cli import avm
from vims.checks.cli import baseline, check
from vims.demo import demo
from vims.errors import VimsError
from vims.lab.cli import lab
from vims.rems.cli import rems
from vims.tpm.cli import tpm
from vims.vmi.cli import events, profile


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vims")
def cli() -> None:
    """VIMS: attest the semantic integrity of virtual machines by introspection."""


cli.add_command(lab)
cli.add_command(demo)
cli.add_command(check)
cli.add_command(baseline)
cli.add_command(profile)
cli.add_command(events)
cli.add_command(tpm)
cli.add_command(rems)
cli.add_command(avm)


def main(argv: list[str] | None = None) -> int:
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
