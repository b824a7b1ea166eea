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
    AkAlgorithmError,
    AkAttributesError,
    BadMagic,
    BadSignature,
    CounterRegression,
    Malformed,
    PcrValuesMissing,
    QuoteError,
    TrailingBytes,
    UnsupportedAlgorithm,
    check_ak_public,
    kdfa,
    parse_attest,
    parse_public,
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
    # SM2 (0x001B) with garbage that no crypto could check.
    sig = struct.pack(">HH", 0x001B, 0x000B) + b"\xff" * 10
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


# --- AK public areas (enrollment): crafted TPMT_PUBLIC, one test per attribute --------

FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 0x00000002, 0x00000010, 0x00000020
USER_WITH_AUTH, RESTRICTED, DECRYPT, SIGN = 0x00000040, 0x00010000, 0x00020000, 0x00040000
AK_ATTRS = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | RESTRICTED | SIGN
ALG_RSA, ALG_ECC, ALG_NULL = 0x0001, 0x0023, 0x0010
ALG_SHA1, ALG_SHA256, ALG_SHA384 = 0x0004, 0x000B, 0x000C
ALG_RSASSA, ALG_RSAES, ALG_RSAPSS, ALG_OAEP = 0x0014, 0x0015, 0x0016, 0x0017
ALG_ECDSA, ALG_ECDAA, ALG_AES, ALG_CFB = 0x0018, 0x001A, 0x0006, 0x0043


def tpm2b_public(
    kind: str = "ecc",
    *,
    name_alg: int = ALG_SHA256,
    attrs: int = AK_ATTRS,
    symmetric: tuple[int, int, int] | None = None,
    scheme: int | None = None,
    scheme_hash: int = ALG_SHA256,
    curve: int = 0x0003,
    rsa_bits: int = 2048,
) -> bytes:
    """A marshalled TPM2B_PUBLIC as a TPM (or an attacker) would send it."""
    body = struct.pack(">HHI", ALG_ECC if kind == "ecc" else ALG_RSA, name_alg, attrs)
    body += struct.pack(">H", 0)  # empty authPolicy
    body += struct.pack(">HHH", *symmetric) if symmetric else struct.pack(">H", ALG_NULL)
    scheme = (ALG_ECDSA if kind == "ecc" else ALG_RSASSA) if scheme is None else scheme
    if scheme in (ALG_NULL, ALG_RSAES):
        body += struct.pack(">H", scheme)
    elif scheme == ALG_ECDAA:
        body += struct.pack(">HHH", scheme, scheme_hash, 0)
    else:
        body += struct.pack(">HH", scheme, scheme_hash)
    if kind == "ecc":
        ec_curve = ec.SECP384R1() if curve == 0x0004 else ec.SECP256R1()
        nums = ec.generate_private_key(ec_curve).public_key().public_numbers()
        size = (ec_curve.key_size + 7) // 8
        body += struct.pack(">HH", curve, ALG_NULL)  # curveID, kdf NULL
        for v in (nums.x, nums.y):
            body += struct.pack(">H", size) + v.to_bytes(size, "big")
    else:
        from cryptography.hazmat.primitives.asymmetric import rsa as rsa_mod

        n = _rsa_modulus(rsa_bits, rsa_mod)
        body += struct.pack(">HI", rsa_bits, 0) + struct.pack(">H", len(n)) + n
    return struct.pack(">H", len(body)) + body


_RSA_CACHE: dict[int, bytes] = {}


def _rsa_modulus(bits: int, rsa_mod: object) -> bytes:
    if bits not in _RSA_CACHE:
        key = rsa_mod.generate_private_key(65537, bits)  # type: ignore[attr-defined]
        _RSA_CACHE[bits] = key.public_key().public_numbers().n.to_bytes(bits // 8, "big")
    return _RSA_CACHE[bits]


@pytest.mark.parametrize("blob", [
    tpm2b_public(),  # what vims.tpm.attester creates: ecc256:ecdsa-sha256:null
    tpm2b_public(curve=0x0004, scheme_hash=ALG_SHA384, name_alg=ALG_SHA384),
    tpm2b_public("rsa"),
    tpm2b_public("rsa", scheme=ALG_RSAPSS, scheme_hash=ALG_SHA384, rsa_bits=3072),
], ids=["ecc-p256", "ecc-p384", "rsa2048-rsassa", "rsa3072-rsapss"])
def test_ak_public_accepted(blob: bytes) -> None:
    ak = parse_public(blob)
    check_ak_public(ak)
    assert ak.scheme in (ALG_ECDSA, ALG_RSASSA, ALG_RSAPSS)
    assert ak.scheme_hash in (ALG_SHA256, ALG_SHA384)
    assert ak.key_bits in (256, 384, 2048, 3072)


def test_ak_public_records_the_scheme() -> None:
    ak = parse_public(tpm2b_public(curve=0x0004, scheme_hash=ALG_SHA384))
    assert (ak.scheme, ak.scheme_hash, ak.curve, ak.key_bits) == (ALG_ECDSA, ALG_SHA384, 4, 384)
    rsa_ak = parse_public(tpm2b_public("rsa", scheme=ALG_RSAPSS))
    assert (rsa_ak.scheme, rsa_ak.scheme_hash, rsa_ak.curve, rsa_ak.key_bits) == (
        ALG_RSAPSS, ALG_SHA256, 0, 2048)


@pytest.mark.parametrize(("attrs", "missing"), [
    (AK_ATTRS & ~RESTRICTED, "restricted"),  # would sign anything, forged quotes included
    (AK_ATTRS & ~SIGN, "sign"),
    (AK_ATTRS | DECRYPT, "decrypt"),
    (AK_ATTRS & ~FIXED_TPM, "fixedTPM"),  # duplicable: may live outside this TPM
    (AK_ATTRS & ~FIXED_PARENT, "fixedParent"),
    (AK_ATTRS & ~SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),  # imported key
])
def test_ak_public_attribute_refused(attrs: int, missing: str) -> None:
    with pytest.raises(AkAttributesError) as exc:
        check_ak_public(parse_public(tpm2b_public(attrs=attrs)))
    assert exc.value.reason == "ak-attributes"
    assert missing in exc.value.detail


@pytest.mark.parametrize("blob", [
    tpm2b_public(name_alg=ALG_SHA1),
    tpm2b_public(scheme=ALG_NULL),  # the TPM would sign with any scheme the caller names
    tpm2b_public(scheme_hash=ALG_SHA1),
    tpm2b_public(scheme=ALG_ECDAA),
    tpm2b_public("rsa", rsa_bits=1024),
    tpm2b_public("rsa", scheme=ALG_RSAES),
    tpm2b_public("rsa", scheme=ALG_OAEP),
    tpm2b_public("rsa", scheme_hash=ALG_SHA1),
    tpm2b_public(symmetric=(ALG_AES, 128, ALG_CFB)),
], ids=["sha1-name", "null-scheme", "sha1-scheme", "ecdaa", "rsa1024", "rsaes", "oaep",
        "rsassa-sha1", "symmetric"])
def test_ak_public_algorithm_refused(blob: bytes) -> None:
    with pytest.raises(AkAlgorithmError) as exc:
        check_ak_public(parse_public(blob))
    assert exc.value.reason == "ak-algorithm"


def test_ak_public_unknown_curve_refused() -> None:
    with pytest.raises(UnsupportedAlgorithm):  # BN P-256: not a curve an AK may use
        check_ak_public(parse_public(tpm2b_public(curve=0x0010)))


def test_public_area_inconsistent_rsa_size_is_malformed() -> None:
    blob = bytearray(tpm2b_public("rsa"))
    # keyBits says 2048, the modulus is 2048 bits: claim 4096 instead.
    at = bytes(blob).index(struct.pack(">HI", 2048, 0))
    blob[at : at + 2] = struct.pack(">H", 4096)
    with pytest.raises(Malformed):
        parse_public(bytes(blob))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_fuzz_public_parser_raises_only_quote_errors(pos: int, insert: bytes) -> None:
    blob = bytearray(tpm2b_public())
    blob[pos : pos + len(insert)] = insert
    with contextlib.suppress(QuoteError):
        check_ak_public(parse_public(bytes(blob)))


def test_rsapss_quote_verifies() -> None:
    """An RSAPSS AK (accepted at enrollment) gets its quotes verified, whatever the salt."""
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    rkey = rsa.generate_private_key(65537, 2048)
    a = attest_bytes()
    for salt in (32, padding.PSS.MAX_LENGTH):
        raw = rkey.sign(a, padding.PSS(padding.MGF1(hashes.SHA256()), salt), hashes.SHA256())
        sig = struct.pack(">HHH", 0x0016, 0x000B, len(raw)) + raw
        verify_quote(rkey.public_key(), a, sig, NONCE, pcrs_arg(), [0, 17])
    with pytest.raises(BadSignature):
        verify_quote(rkey.public_key(), a + b"", sig[:-1] + b"\0", NONCE, pcrs_arg())
