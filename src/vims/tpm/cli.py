"""``vims tpm``: offline verification of vTPM evidence.

Exit status (CLI contract): 0 valid, 1 rejected (``vims: quote rejected:
<reason>: <detail>`` on stderr), 2 bad input (one line, via VimsError).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from vims.errors import VimsError
from vims.tpm.verifier import BANKS, ClockInfo, QuoteError, load_public_key, verify_quote


class TpmInputError(VimsError):
    """A file or argument given to ``vims tpm`` is missing or malformed."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TpmInputError(f"cannot read {what} {path}: {exc.strerror}") from None


def _hex(value: str, what: str) -> bytes:
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise TpmInputError(f"{what} is not hex: {value!r}") from None


def load_pcrs_json(data: bytes) -> dict[str, dict[int, bytes]]:
    """Parse ``{"sha256": {"17": "hex", ...}}`` (index keys as strings or ints)."""
    try:
        doc: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TpmInputError(f"PCR file is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise TpmInputError("PCR file must be an object of banks")
    out: dict[str, dict[int, bytes]] = {}
    for bank, values in doc.items():
        if bank not in BANKS:
            raise TpmInputError(f"unknown PCR bank {bank!r}")
        if not isinstance(values, dict):
            raise TpmInputError(f"PCR bank {bank} must map indices to hex values")
        for idx, val in values.items():
            try:
                i = int(idx)
            except ValueError:
                raise TpmInputError(f"PCR index {idx!r} is not an integer") from None
            if not isinstance(val, str | int):
                raise TpmInputError(f"PCR {bank}:{idx} value is not a hex string")
            # tpm2_quote -o writes YAML where unquoted hex may come back as an int.
            text = f"{val:x}" if isinstance(val, int) else val
            out.setdefault(bank, {})[i] = _hex(text, f"PCR {bank}:{idx}")
    return out


def _reject(exc: QuoteError, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps({"valid": False, "reason": exc.reason, "detail": exc.detail}))
    click.echo(f"vims: quote rejected: {exc.reason}: {exc.detail}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def tpm() -> None:
    """vTPM evidence: verify quotes offline (REM-S side)."""


@tpm.command("verify-quote")
@click.option("--ak", "ak_path", required=True, help="AK public key, PEM.")
@click.option("--quote", "quote_path", required=True, help="TPMS_ATTEST as signed.")
@click.option("--signature", "sig_path", required=True, help="Marshalled TPMT_SIGNATURE.")
@click.option("--nonce", required=True, help="Nonce sent as qualifyingData, hex.")
@click.option("--pcrs", "pcrs_path", required=True, help='JSON {"sha256": {"17": "hex"}}.')
@click.option(
    "--expect-pcrs", default=None, help="Exact sha256 PCRs the quote must cover, e.g. 0,17."
)
@click.option(
    "--ak-qualified-name", default=None, help="Hex; tells a wrong key from a bad signature."
)
@click.option("--previous-counters", default=None, help="RESET:RESTART of the last accepted quote.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def verify_quote_cmd(
    ak_path: str,
    quote_path: str,
    sig_path: str,
    nonce: str,
    pcrs_path: str,
    expect_pcrs: str | None,
    ak_qualified_name: str | None,
    previous_counters: str | None,
    fmt: str,
) -> None:
    """Verify a TPM2_Quote: exit 0 valid, 1 rejected, 2 bad input."""
    try:
        try:
            key = load_public_key(_read(ak_path, "AK"))
        except QuoteError as exc:
            raise TpmInputError(f"AK {ak_path}: {exc.detail}") from None
        attest = _read(quote_path, "quote")
        sig = _read(sig_path, "signature")
        nonce_b = _hex(nonce, "--nonce")
        pcrs = load_pcrs_json(_read(pcrs_path, "PCR file"))
        expected = None
        if expect_pcrs is not None:
            try:
                expected = [int(x) for x in expect_pcrs.split(",") if x.strip()]
            except ValueError:
                raise TpmInputError(
                    f"--expect-pcrs is not a list of integers: {expect_pcrs}"
                ) from None
        previous = None
        if previous_counters is not None:
            try:
                reset_s, restart_s = previous_counters.split(":")
                previous = ClockInfo(0, int(reset_s), int(restart_s), True)
            except ValueError:
                raise TpmInputError("--previous-counters must be RESET:RESTART") from None
        qn = _hex(ak_qualified_name, "--ak-qualified-name") if ak_qualified_name else None
    except VimsError as exc:
        click.echo(f"vims: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    try:
        result = verify_quote(
            key, attest, sig, nonce_b, pcrs, expected, previous, ak_qualified_name=qn
        )
    except QuoteError as exc:
        _reject(exc, fmt)
        return
    if fmt == "json":
        click.echo(json.dumps(result.to_json(), indent=1))
    else:
        ci = result.clock_info
        sel = ", ".join(
            f"{bank}:{','.join(map(str, sorted(v)))}" for bank, v in result.pcrs.items()
        )
        click.echo(
            f"quote valid: pcrs {sel}; resetCount {ci.reset_count}, restartCount {ci.restart_count}"
        )
