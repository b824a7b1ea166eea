"""``vims rems``: the remote server's commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from vims.rems import config as config_mod
from vims.rems.store import Store


@click.group()
def rems() -> None:
    """The REM-S: verifier, verdicts (EAR), decision API, audit log."""


@rems.group()
def audit() -> None:
    """The append-only, hash-chained audit log."""


@audit.command("verify")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="REM-S config (its database is checked).")
@click.option("--database", help="SQLAlchemy URL, instead of --config.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def verify(config_path: Path | None, database: str | None, fmt: str) -> None:
    """Walk the audit chain; exit 0 intact, 1 broken, 2 error."""
    if (config_path is None) == (database is None):
        raise click.UsageError("give --config or --database")
    url = database or config_mod.load(config_path).database  # type: ignore[arg-type]
    result = Store(url).verify_audit()
    if fmt == "json":
        click.echo(json.dumps({"ok": result.ok, "entries": result.entries,
                               "first_bad_id": result.first_bad_id, "reason": result.reason}))
    elif result.ok:
        click.echo(f"audit log intact: {result.entries} entries")
    else:
        click.echo(f"audit log BROKEN at entry {result.first_bad_id}: {result.reason} "
                   f"({result.entries} entries read)")
    sys.exit(0 if result.ok else 1)
