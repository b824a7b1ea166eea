"""Pure-Python verifier, event log and CLI input handling (no TPM needed).

Evidence here is crafted and signed with software keys: that is what an
attacker can do, and it reaches the structural checks (bad magic, trailing
bytes, unsupported algorithms) that a real TPM never produces.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from vims.tpm.cli import tpm
from vims.tpm.eventlog import EventLog, MalformedEventLog, NotGolden, ReplayMismatch, replay
from vims.tpm.verifier import (
    BadMagic,
    CounterRegression,
    Malformed,
    PcrValuesMissing,
    QuoteError,
    TrailingBytes,
    UnsupportedAlgorithm,
    kdfa,
    parse_attest,
    parse_signature,
    verify_quote,
)

NONCE = b"\x01\x02\x03\x04"
PCR0 = b"\0" * 32
PCR17 = hashlib.sha256(b"pcr17").digest()


def attest_bytes(
    magic: int = 0xFF544347,
    st_type: int = 0x8018,
    nonce: bytes = NONCE,
    reset: int = 1,
    restart: int = 0,
    pcrs: dict[int, bytes] | None = None,
) -> bytes:
    pcrs = {0: PCR0, 17: PCR17} if pcrs is None else pcrs
    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    digest = hashlib.sha256(b"".join(pcrs[i] for i in sorted(pcrs))).digest()
    signer = b"\x00\x0b" + b"\x11" * 32
    return (
        struct.pack(">IH", magic, st_type)
        + struct.pack(">H", len(signer)) + signer
        + struct.pack(">H", len(nonce)) + nonce
        + struct.pack(">QIIB", 1000, reset, restart, 1)
        + struct.pack(">Q", 0x2019)
        + struct.pack(">IHB", 1, 0x000B, 3) + bytes(bitmap)
        + struct.pack(">H", 32) + digest
    )  # fmt: skip


def sign(key: ec.EllipticCurvePrivateKey, data: bytes, sig_alg: int = 0x0018) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return struct.pack(">HH", sig_alg, 0x000B) + b"".join(
        struct.pack(">H", 32) + v.to_bytes(32, "big") for v in (r, s)
    )


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pcrs_arg() -> dict[str, dict[int, bytes]]:
    return {"sha256": {0: PCR0, 17: PCR17}}


def test_crafted_quote_verifies(key: ec.EllipticCurvePrivateKey, pem: bytes) -> None:
    a = attest_bytes()
    result = verify_quote(pem, a, sign(key, a), NONCE, pcrs_arg(), [0, 17])
    assert result.clock_info.reset_count == 1


def test_bad_magic(key: ec.EllipticCurvePrivateKey, pem: bytes) -> None:
    a = attest_bytes(magic=0xFF544348)
    with pytest.raises(BadMagic) as exc:
        verify_quote(pem, a, sign(key, a), NONCE, pcrs_arg())
    assert exc.value.reason == "bad-magic"


def test_trailing_byte(key: ec.EllipticCurvePrivateKey, pem: bytes) -> None:
    a = attest_bytes() + b"\0"
    with pytest.raises(TrailingBytes) as exc:
        verify_quote(pem, a, sign(key, a), NONCE, pcrs_arg())
    assert exc.value.reason == "trailing-bytes"
    with pytest.raises(TrailingBytes):
        parse_signature(sign(key, a) + b"\0")


def test_unsupported_signature_algorithm_rejected_before_crypto(pem: bytes) -> None:
    # RSAPSS (0x0016) with garbage that no crypto could check.
    sig = struct.pack(">HH", 0x0016, 0x000B) + b"\xff" * 10
    with pytest.raises(UnsupportedAlgorithm) as exc:
        verify_quote(pem, attest_bytes(), sig, NONCE, pcrs_arg())
    assert exc.value.reason == "unsupported-algorithm"
    with pytest.raises(UnsupportedAlgorithm):  # ECDSA with SHA-1
        parse_signature(struct.pack(">HH", 0x0018, 0x0004))


def test_counter_regression_by_two_quotes(key: ec.EllipticCurvePrivateKey, pem: bytes) -> None:
    first = verify_quote(pem, a1 := attest_bytes(restart=3), sign(key, a1), NONCE, pcrs_arg())
    a2 = attest_bytes(restart=2)
    with pytest.raises(CounterRegression):
        verify_quote(pem, a2, sign(key, a2), NONCE, pcrs_arg(), previous_clock=first.clock_info)


def test_missing_pcr_value(key: ec.EllipticCurvePrivateKey, pem: bytes) -> None:
    a = attest_bytes()
    with pytest.raises(PcrValuesMissing):
        verify_quote(pem, a, sign(key, a), NONCE, {"sha256": {0: PCR0}})


def test_truncated_attest_is_malformed() -> None:
    a = attest_bytes()
    for cut in range(len(a)):
        with pytest.raises(Malformed):
            parse_attest(a[:cut])


def test_kdfa_known_length() -> None:
    out = kdfa(0x000B, b"k", b"STORAGE", b"name", b"", 128)
    assert len(out) == 16
    assert out == kdfa(0x000B, b"k", b"STORAGE", b"name", b"", 128)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_attest_parser_raises_only_quote_errors(data: bytes) -> None:
    with contextlib.suppress(QuoteError):
        parse_attest(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 120), st.binary(max_size=4))
def test_fuzz_mutated_attest(noise: bytes, pos: int, insert: bytes) -> None:
    a = bytearray(attest_bytes())
    a[pos : pos + len(insert)] = insert
    with contextlib.suppress(QuoteError):
        parse_attest(bytes(a) + noise)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_signature_parser_raises_only_quote_errors(data: bytes) -> None:
    with contextlib.suppress(QuoteError):
        parse_signature(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.binary(max_size=120))
def test_fuzz_verify_quote_raises_only_quote_errors(attest: bytes, sig: bytes) -> None:
    pem_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with contextlib.suppress(QuoteError):
        verify_quote(pem_key, attest, sig, NONCE, pcrs_arg())


# --- event log ----------------------------------------------------------------------


def _log() -> tuple[EventLog, dict[int, bytes]]:
    log = EventLog()
    value = b"\0" * 32
    for kind, data in [("code", b"a"), ("config", b"b"), ("baseline", b"c")]:
        value = hashlib.sha256(value + log.add(data, kind, f"{kind}.bin")).digest()
    return log, {23: value}


def test_event_log_replay_and_golden() -> None:
    log, quoted = _log()
    golden = {e.description: e.digest for e in log.entries}
    assert replay(EventLog.from_json(log.to_json()), quoted, golden) == quoted


def test_event_log_tampered_entry() -> None:
    log, quoted = _log()
    doc = json.loads(log.to_json())
    doc["entries"][1]["digest"] = hashlib.sha256(b"evil").hexdigest()
    with pytest.raises(ReplayMismatch) as exc:
        replay(EventLog.from_json(json.dumps(doc)), quoted)
    assert exc.value.reason == "replay-mismatch"


def test_event_log_not_golden() -> None:
    log, quoted = _log()
    golden = {e.description: e.digest for e in log.entries}
    golden["config.bin"] = "00" * 32
    with pytest.raises(NotGolden):
        replay(log, quoted, golden)


def test_event_log_malformed() -> None:
    with pytest.raises(MalformedEventLog):
        EventLog.from_json(
            '{"entries": [{"pcr": 23, "digest": "zz", "type": "t", "description": "d"}]}'
        )
    with pytest.raises(MalformedEventLog):
        EventLog.from_json("not json")


# --- CLI (CliRunner, before registration in vims.cli) ----------------------------------


@pytest.fixture
def evidence(tmp_path: Path, key: ec.EllipticCurvePrivateKey, pem: bytes) -> list[str]:
    a = attest_bytes()
    (tmp_path / "ak.pem").write_bytes(pem)
    (tmp_path / "attest.bin").write_bytes(a)
    (tmp_path / "sig.bin").write_bytes(sign(key, a))
    (tmp_path / "pcrs.json").write_text(
        json.dumps({"sha256": {"0": PCR0.hex(), "17": PCR17.hex()}})
    )
    return ["verify-quote", "--ak", str(tmp_path / "ak.pem"),
            "--quote", str(tmp_path / "attest.bin"), "--signature", str(tmp_path / "sig.bin"),
            "--pcrs", str(tmp_path / "pcrs.json")]  # fmt: skip


def test_cli_valid_and_rejected(evidence: list[str]) -> None:
    runner = CliRunner()
    ok = runner.invoke(tpm, [*evidence, "--nonce", NONCE.hex(), "--format", "json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["valid"] is True
    bad = runner.invoke(tpm, [*evidence, "--nonce", "ff"])
    assert bad.exit_code == 1
    assert bad.stderr.startswith("vims: quote rejected: nonce-mismatch:")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--nonce": "zz"}, "--nonce is not hex"),
        ({"--pcrs": "/nonexistent/pcrs.json"}, "cannot read PCR file"),
        ({"--ak": "/nonexistent/ak.pem"}, "cannot read AK"),
    ],
)
def test_cli_bad_input_exits_2(evidence: list[str], change: dict[str, str], message: str) -> None:
    args = [*evidence, "--nonce", NONCE.hex()]
    for opt, val in change.items():
        args[args.index(opt) + 1] = val
    res = CliRunner().invoke(tpm, args)
    assert res.exit_code == 2
    assert res.stderr.startswith("vims: error: ")
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_bad_json_exits_2(evidence: list[str], tmp_path: Path) -> None:
    (tmp_path / "pcrs.json").write_text("{not json")
    res = CliRunner().invoke(tpm, [*evidence, "--nonce", NONCE.hex()])
    assert res.exit_code == 2
    assert "not JSON" in res.stderr
