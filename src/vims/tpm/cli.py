"""``vims tpm``: offline verification of vTPM evidence, and vTPM manufacturing.

Exit status (CLI contract): 0 valid, 1 rejected (``vims: quote rejected:
<reason>: <detail>`` on stderr), 2 bad input (one line, via VimsError).

Manufacturing a vTPM across two hosts (the A-VM host never holds an EK CA key)::

    rems$ vims tpm ek-ca init --dir /var/lib/vims/rems/ek-ca
    avm$  vims tpm ek-public --tcti T --out ek.json
    rems$ vims tpm ek-ca issue --dir /var/lib/vims/rems/ek-ca --ek-public ek.json --out ek.pem
    avm$  vims tpm ek-cert install --tcti T --cert ek.pem
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

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
    """vTPM evidence: verify quotes offline (REM-S side); manufacture vTPMs (EK certificates)."""


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


# --- manufacturing: the EK CA on the REM-S host, the EK certificate in the TPM's NV ---

F = TypeVar("F", bound=Callable[..., None])


def _one_line_errors(func: F) -> F:
    """VimsError -> ``vims: error: ...`` and its exit code, also outside ``vims.cli``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except VimsError as exc:
            click.echo(f"vims: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def _report(fmt: str, doc: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(doc, indent=1) if fmt == "json" else text)


_EK_KINDS = click.Choice(["rsa", "ecc"])


@contextlib.contextmanager
def _attester(tcti: str) -> Iterator[Any]:
    """An Attester whose TSS errors become one-line errors (exit 2)."""
    from tpm2_pytss import TSS2_Exception  # type: ignore[import-untyped]

    from vims.tpm.attester import Attester, AttesterError

    try:
        with Attester(tcti) as a:
            yield a
    except (TSS2_Exception, AttesterError) as exc:
        raise TpmInputError(f"TPM at {tcti!r}: {exc}") from None


@tpm.group("ek-ca")
def ek_ca() -> None:
    """The EK CA that certifies vTPM EKs (REM-S host only: it holds the CA key)."""


@ek_ca.command("init")
@click.option("--dir", "ca_dir", required=True, type=click.Path(path_type=Path),
              help="CA directory (created 0700, keys 0600).")
@click.option("--name", default="VIMS EK CA", show_default=True, help="CA common name.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@_one_line_errors
def ek_ca_init(ca_dir: Path, name: str, fmt: str) -> None:
    """Create the EK CA (root + issuing intermediate) unless it exists; exit 0 or 2."""
    from vims.tpm.ekca import EkCa

    ca, created = EkCa.init(ca_dir, name)
    paths = [str(p) for p in ca.cert_paths]
    _report(fmt, {"changed": created, "ek_ca_certs": paths},
            f"EK CA {'created' if created else 'exists'}: trust {' '.join(paths)}")


@ek_ca.command("issue")
@click.option("--dir", "ca_dir", required=True, type=click.Path(path_type=Path),
              help="CA directory made by `ek-ca init`.")
@click.option("--ek-public", "ek_public", required=True, type=click.Path(path_type=Path),
              help="JSON written by `vims tpm ek-public` on the A-VM host.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="EK certificate to write (PEM).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@_one_line_errors
def ek_ca_issue(ca_dir: Path, ek_public: Path, out: Path, fmt: str) -> None:
    """Certify an EK: exit 0 issued (or already was), 1 not an EK, 2 bad input."""
    from cryptography.hazmat.primitives import serialization

    from vims.tpm.ekca import EkCa, TpmInfo

    try:
        doc = json.loads(_read(str(ek_public), "EK public"))
        public = base64.b64decode(doc["ek_public_b64"], validate=True)
        tpm_doc = doc.get("tpm", {})
        info = TpmInfo(**{k: tpm_doc[k] for k in TpmInfo.__dataclass_fields__ if k in tpm_doc})
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise TpmInputError(f"{ek_public} is not `vims tpm ek-public` output: {exc}") from None
    cert, issued = EkCa(ca_dir).issue(public, info)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    changed = not out.exists() or out.read_bytes() != pem
    if changed:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(pem)
        tmp.replace(out)
    _report(fmt, {"changed": changed, "issued": issued, "serial": f"{cert.serial_number:x}",
                  "out": str(out)},
            f"EK certificate {cert.serial_number:x} {'issued' if issued else 'reused'}: {out}")


@tpm.command("ek-public")
@click.option("--tcti", required=True, help="The TPM, e.g. device:/dev/tpmrm0.")
@click.option("--ek", "kind", type=_EK_KINDS, default="rsa", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the JSON here instead of stdout.")
@_one_line_errors
def ek_public_cmd(tcti: str, kind: str, out: Path | None) -> None:
    """The TPM's EK public area and attributes, as JSON for `ek-ca issue`."""
    with _attester(tcti) as a:
        public = a.ek_public() if kind == "rsa" else a.ecc_ek_public()
        doc = {"ek": kind, "ek_public_b64": base64.b64encode(public).decode(),
               "tpm": a.tpm_info()}
    text = json.dumps(doc, indent=1)
    if out is None:
        click.echo(text)
    else:
        out.write_text(text + "\n")


@tpm.group("ek-cert")
def ek_cert() -> None:
    """The EK certificate in the TPM's NV (A-VM host)."""


@ek_cert.command("install")
@click.option("--tcti", required=True, help="The TPM, e.g. device:/dev/tpmrm0.")
@click.option("--cert", "cert_path", required=True, type=click.Path(path_type=Path),
              help="EK certificate (PEM or DER) issued by `ek-ca issue`.")
@click.option("--ek", "kind", type=_EK_KINDS, default="rsa", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@_one_line_errors
def ek_cert_install(tcti: str, cert_path: Path, kind: str, fmt: str) -> None:
    """Write the EK certificate into NV (0x01c00002 RSA, 0x01c00016 ECC); exit 0 or 2."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from vims.tpm.attester import NV_EK_CERT_ECC, NV_EK_CERT_RSA2048
    from vims.tpm.verifier import parse_public

    raw = _read(str(cert_path), "certificate")
    try:
        cert = (x509.load_pem_x509_certificate(raw) if raw.lstrip().startswith(b"-----BEGIN")
                else x509.load_der_x509_certificate(raw))
    except ValueError as exc:
        raise TpmInputError(f"{cert_path} is not an X.509 certificate: {exc}") from None
    index = NV_EK_CERT_RSA2048 if kind == "rsa" else NV_EK_CERT_ECC
    with _attester(tcti) as a:
        ek = parse_public(a.ek_public() if kind == "rsa" else a.ecc_ek_public())
        if cert.public_key() != ek.key:
            # The certificate of another TPM's EK: enrollment would refuse it later,
            # with a less telling message.
            raise TpmInputError(f"{cert_path} certifies another key than this TPM's {kind} EK")
        changed = a.install_ek_certificate(cert.public_bytes(serialization.Encoding.DER), index)
    _report(fmt, {"changed": changed, "nv_index": f"0x{index:08x}"},
            f"EK certificate {'written to' if changed else 'already in'} NV 0x{index:08x}")
