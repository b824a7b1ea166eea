"""``vims rems``: the remote server's commands."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click
from cryptography.hazmat.primitives.asymmetric import ec

from vims.rems import audit as audit_mod
from vims.rems import config as config_mod
from vims.rems.audit import AuditError
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

    from vims.rems.httpguard import OncePerInterval
    from vims.rems.server import RemsServer

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # A flood repeats the same error per socket (accept out of file descriptors, TLS
    # handshakes cut off): once per interval is enough to see it, not to fill a disk.
    for noisy in ("asyncio", "uvicorn.error"):
        logging.getLogger(noisy).addFilter(OncePerInterval(10.0))
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
def token() -> None:
    """Scoped API credentials: operator (writes), read, enroll (one A-VM, single use)."""


def _store(config_path: Path) -> Store:
    return Store(config_mod.load(config_path).database)


_CONFIG = click.option("--config", "config_path", type=click.Path(path_type=Path),
                       required=True, help="The REM-S config (its database is used).")
_FORMAT = click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")


@token.command("create")
@_CONFIG
@click.option("--scope", type=click.Choice(["operator", "read", "enroll"]), required=True)
@click.option("--avm", "avm_id", help="The A-VM an enroll token enrolls.")
@click.option("--ttl", "ttl_s", type=click.FloatRange(min=1, max=366 * 86400),
              help="Seconds the token is valid (default: until revoked).")
@click.option("--note", default="", help="What the token is for (listed, not secret).")
@_FORMAT
def token_create(config_path: Path, scope: str, avm_id: str | None, ttl_s: float | None,
                 note: str, fmt: str) -> None:
    """Make a token; its secret is printed once (stored only as a hash)."""
    from vims.rems.store import StoreError

    try:
        made, secret = _store(config_path).create_token(scope, avm_id, note, ttl_s)
    except StoreError as exc:
        raise click.UsageError(str(exc)) from exc
    if fmt == "json":
        click.echo(json.dumps({"token": secret, "token_id": made.token_id, "scope": scope,
                               "avm": avm_id, "expires_at": made.expires_at}))
    else:
        click.echo(secret)


@token.command("list")
@_CONFIG
@_FORMAT
def token_list(config_path: Path, fmt: str) -> None:
    """The tokens (never their secrets)."""
    rows = [{"token_id": t.token_id, "scope": t.scope, "avm": t.avm_id, "note": t.note,
             "expires_at": t.expires_at, "used_at": t.used_at}
            for t in _store(config_path).tokens()]
    if fmt == "json":
        click.echo(json.dumps(rows))
    for r in rows if fmt == "text" else []:
        click.echo(f"{r['token_id']}  {r['scope']:<8} {r['avm'] or '-':<16} {r['note']}")


@token.command("revoke")
@_CONFIG
@click.argument("token_id")
def token_revoke(config_path: Path, token_id: str) -> None:
    """Revoke a token by its id; exit 1 when there is no such token."""
    if not _store(config_path).revoke_token(token_id):
        click.echo(f"no token {token_id}", err=True)
        sys.exit(1)


@rems.command()
@_CONFIG
@click.option("--cvm", required=True)
@click.option("--avm", "avm_id", required=True)
@click.option("--move", is_flag=True, help="Take the C-VM from the A-VM it is bound to now.")
def bind(config_path: Path, cvm: str, avm_id: str, move: bool) -> None:
    """Let one A-VM (alone) report on a C-VM (a running REM-S applies it within seconds)."""
    from vims.rems.store import BindingConflict
    from vims.rems.verdict import NAME_RE

    for name in (cvm, avm_id):
        if not NAME_RE.match(name):
            raise click.UsageError(f"{name!r} is not a C-VM or A-VM name")
    try:
        changed = _store(config_path).bind(cvm, avm_id, move)
    except BindingConflict as exc:
        click.echo(f"vims: error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"C-VM {cvm} bound to A-VM {avm_id}" + ("" if changed else " (unchanged)"))


@rems.group()
def audit() -> None:
    """The append-only, hash-chained audit log and its signed checkpoints."""


@audit.command("verify")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="REM-S config: its database is checked, with its signing key.")
@click.option("--database", help="SQLAlchemy URL, instead of --config.")
@click.option("--jwks", "jwks_path", type=click.Path(path_type=Path),
              help="The REM-S JWK set (/.well-known/jwks.json) to check checkpoints with.")
@click.option("--public-key", "public_key_path", type=click.Path(path_type=Path),
              help="The REM-S public key (PEM) to check checkpoints with.")
@click.option("--checkpoints", "checkpoints", type=click.Path(path_type=Path),
              help="The append-only checkpoint file (default: the config's, if any).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def verify(config_path: Path | None, database: str | None, jwks_path: Path | None,
           public_key_path: Path | None, checkpoints: Path | None, fmt: str) -> None:
    """Walk the audit chain and check its signed checkpoints; exit 0 intact, 1 broken,
    2 error.

    Checkpoint signatures are checked with --jwks or --public-key, else with the
    key of --config (the public half of its signing_key). With --database alone
    they are not checked, and the output says so.
    """
    if (config_path is None) == (database is None):
        raise click.UsageError("give --config or --database")
    if jwks_path is not None and public_key_path is not None:
        raise click.UsageError("give --jwks or --public-key, not both")
    cfg = config_mod.load(config_path) if config_path is not None else None
    keys: audit_mod.Keys | None = None
    if jwks_path is not None:
        keys = _load_jwks(jwks_path)
    elif public_key_path is not None:
        keys = _load_public_key(public_key_path)
    elif cfg is not None:
        keys = _load_signing_key(cfg.signing_key)
    if checkpoints is None and cfg is not None:
        checkpoints = cfg.audit_checkpoint_file
    url = database if cfg is None else cfg.database
    assert url is not None
    result = audit_mod.verify(Store(url), keys, checkpoints)
    if fmt == "json":
        click.echo(json.dumps(result.as_dict()))
    else:
        click.echo(_describe(result))
    sys.exit(0 if result.ok else 1)


def _describe(result: audit_mod.AuditReport) -> str:
    """Text output: the first line as it always was, then what the checkpoints add."""
    if not result.ok:
        where = f"entry {result.first_bad_id}" if result.first_bad_id is not None \
            else "its checkpoints"
        lines = [f"audit log BROKEN at {where}: {result.reason} ({result.entries} entries read)"]
    else:
        lines = [f"audit log intact: {result.entries} entries"]
        if result.checkpoints:
            unsigned = result.unsigned_entries
            lines.append(f"{result.checkpoints} signed checkpoint"
                         f"{'s' if result.checkpoints != 1 else ''}, the last covering "
                         f"{result.signed_entries} entries; {unsigned} "
                         f"entr{'y' if unsigned == 1 else 'ies'} after it unsigned")
        if result.file_checkpoints is not None:
            lines.append(f"{result.file_checkpoints} checkpoints in the checkpoint file match")
    if result.checkpoints or result.file_checkpoints:
        lines += result.notes
    else:
        lines += [n for n in result.notes if not n.startswith("checkpoint signatures")]
    return "\n".join(lines)


def _load_signing_key(path: Path) -> ec.EllipticCurvePublicKey:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except OSError as exc:
        raise AuditError(f"signing key {path}: {exc.strerror} (or give --jwks or "
                         "--public-key)") from exc
    except (ValueError, TypeError) as exc:
        raise AuditError(f"signing key {path}: not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AuditError(f"signing key {path} is not an EC key")
    return key.public_key()


def _load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise AuditError(f"public key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise AuditError(f"public key {path}: not a PEM public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AuditError(f"public key {path} is not an EC key")
    return key


def _load_jwks(path: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    from vims.rems.jws import keys_from_jwks

    try:
        return keys_from_jwks(json.loads(path.read_text()))
    except OSError as exc:
        raise AuditError(f"JWK set {path}: {exc.strerror}") from exc
    except ValueError as exc:  # JSON errors are ValueErrors too
        raise AuditError(f"JWK set {path}: {exc}") from exc
