"""``vims avm``: the A-VM agent."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import signal
from pathlib import Path

import click

from vims.avm import config as config_mod
from vims.errors import VimsError


@click.group()
def avm() -> None:
    """The A-VM agent: introspects its C-VMs, reports to the REM-S."""


@avm.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
@click.option("-v", "--verbose", is_flag=True)
def run(config_path: Path, verbose: bool) -> None:
    """Run the agent until interrupted (reconnects on its own)."""
    from vims.avm.agent import Agent

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    agent = Agent(config_mod.load(config_path))

    def terminate(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt  # so close() runs: a tracer must detach from its C-VM

    signal.signal(signal.SIGTERM, terminate)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1: every thread's stack, for a hang
    try:
        asyncio.run(agent.run())
    except KeyboardInterrupt:
        pass
    finally:
        agent.close()


@avm.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def measure(config_path: Path, fmt: str) -> None:
    """What the agent will measure into PCR 23 (kind, subject, SHA-256), without a TPM.

    The operator approves these digests at the REM-S (PUT
    /v1/avms/A/references/KIND, /v1/cvms/C/references/KIND; the avm role does
    it): an A-VM whose agent code, configuration, or a C-VM's profile, baseline
    or local policy differs from what was approved is not believed.
    """
    from vims.avm.evidence import measurements

    events = measurements(config_mod.load(config_path))
    if fmt == "json":
        click.echo(json.dumps(events, indent=1))
    else:
        for e in events:
            click.echo(f"{e['kind']:<13} {e['subject']:<20} {e['digest']}")


@avm.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
@click.option("--rems-url", required=True, help="The REM-S HTTP API, e.g. https://rems:8080")
@click.option("--token-file", type=click.Path(path_type=Path), required=True,
              help="File holding this A-VM's enrollment token (or an operator token).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def enroll(config_path: Path, rems_url: str, token_file: Path, fmt: str) -> None:
    """Enroll this A-VM's vTPM with the REM-S (EK chain, credential activation).

    Creates the A-VM's key and gets its control-channel certificate from the
    REM-S CA when the configured certificate does not exist yet. An https REM-S
    is verified against the config's ``ca`` (the REM-S CA). Exit 0 enrolled,
    1 refused by the REM-S, 2 error.
    """
    from vims.avm.enroll import enroll as do_enroll

    if not rems_url.startswith(("http://", "https://")):
        raise VimsError(f"--rems-url must be an http(s) URL, not {rems_url!r}")
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise VimsError(f"token file {token_file}: {exc.strerror}") from exc
    result = do_enroll(config_mod.load(config_path), rems_url.rstrip("/"), token)
    if fmt == "json":
        click.echo(json.dumps({"avm_id": result.avm_id, "changed": result.changed,
                               "ak_sha256": result.ak_sha256}))
    else:
        click.echo(f"A-VM {result.avm_id} enrolled (AK sha256 {result.ak_sha256[:16]}…)"
                   + ("" if result.changed else ", unchanged"))
