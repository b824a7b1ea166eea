"""``vims rems``: the remote server's commands."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from vims.rems import config as config_mod
from vims.rems.store import Store


@click.group()
def rems() -> None:
    """The REM-S: verifier, verdicts (EAR), decision API, audit log."""


@rems.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
@click.option("-v", "--verbose", is_flag=True)
def serve(config_path: Path, verbose: bool) -> None:
    """Run the REM-S: control channel (mTLS) and HTTP API."""
    import asyncio
    import logging

    from vims.rems.server import RemsServer

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = RemsServer(config_mod.load(config_path))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(server.run())


@rems.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
@click.option("--avm-id", required=True)
@click.option("--tcti", required=True, help="The A-VM's TPM, e.g. swtpm:host=127.0.0.1,port=P")
def enroll(config_path: Path, avm_id: str, tcti: str) -> None:
    """Enroll an A-VM's vTPM: EK chain, MakeCredential/ActivateCredential, store the AK."""
    from vims.rems.enroll import enroll as do_enroll
    from vims.tpm.attester import Attester

    cfg = config_mod.load(config_path)
    attester = Attester(tcti)
    try:
        attester.create_ak()
        do_enroll(Store(cfg.database), avm_id, attester, cfg.ek_ca_certs)
    finally:
        attester.close()
    click.echo(f"A-VM {avm_id} enrolled")


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
