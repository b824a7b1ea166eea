"""``vims avm``: the A-VM agent."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from vims.avm import config as config_mod


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
    try:
        asyncio.run(agent.run())
    except KeyboardInterrupt:
        pass
    finally:
        agent.close()
