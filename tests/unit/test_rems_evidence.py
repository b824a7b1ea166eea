"""The REM-S believes an A-VM's evidence only when it is genuine AND believable.

Quotes here are real TPMS_ATTEST structures signed by a software key enrolled as
the A-VM's AK, so the TPM counters, ``safe`` and PCR values can be set to what an
attacker (or a rolled-back vTPM state) would present; the real TPM is exercised
by tests/integration. Each case is refused by the REM-S of this issue and was
accepted before it (no counter, safe, reference or channel checks).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from sqlalchemy import select

from vims.protocol.core import bind_nonce
from vims.protocol.messages import Capabilities, EventLogEntry, Evidence, Hello, Quote
from vims.rems import schema
from vims.rems.config import RemsConfig
from vims.rems.server import Attestation, RemsServer

AK = ec.generate_private_key(ec.SECP256R1())
LAUNCH = hashlib.sha256(b"\0" * 32 + hashlib.sha256(b"tboot").digest()).digest()
EVENTS = [("agent-code", "avm1", "c0" * 32), ("agent-config", "avm1", "c1" * 32),
          ("profile", "cvm1", "c2" * 32), ("baseline", "cvm1", "c3" * 32)]
HELLO = Hello(avm_id="avm1", cvms=["cvm1"],
              capabilities=Capabilities(checks=["kernel.text"], backends=["file"]))


def pcr23(events: list[tuple[str, str, str]]) -> bytes:
    value = b"\0" * 32
    for _, _, digest in events:
        value = hashlib.sha256(value + bytes.fromhex(digest)).digest()
    return value


def quote(qualifying: bytes, *, clock: int = 5000, reset: int = 3, restart: int = 0,
          safe: int = 1, launch: bytes = LAUNCH,
          events: list[tuple[str, str, str]] = EVENTS) -> Quote:
    """A TPM2_Quote over PCR 17 and 23 (sha256), signed by the software AK."""
    values = {17: launch, 23: pcr23(events)}
    digest = hashlib.sha256(values[17] + values[23]).digest()
    signer = b"\x00\x0b" + b"\x11" * 32
    attest = (struct.pack(">IH", 0xFF544347, 0x8018)
              + struct.pack(">H", len(signer)) + signer
              + struct.pack(">H", len(qualifying)) + qualifying
              + struct.pack(">QIIB", clock, reset, restart, safe)
              + struct.pack(">Q", 0x2019)
              + struct.pack(">IHB", 1, 0x000B, 3) + bytes([0, 0, 0x82])  # PCR 17 and 23
              + struct.pack(">H", 32) + digest)  # fmt: skip
    r, s = decode_dss_signature(AK.sign(attest, ec.ECDSA(hashes.SHA256())))
    sig = struct.pack(">HH", 0x0018, 0x000B) + b"".join(
        struct.pack(">H", 32) + v.to_bytes(32, "big") for v in (r, s))
    return Quote(attest_b64=base64.b64encode(attest).decode(),
                 signature_b64=base64.b64encode(sig).decode(),
                 pcrs={"sha256": {str(i): v.hex() for i, v in values.items()}})


def evidence(nonce: bytes, events: list[tuple[str, str, str]] = EVENTS, **kw: int) -> Evidence:
    q = quote(nonce, events=events, **kw)  # type: ignore[arg-type]
    return Evidence(quote=q, ak_name="000b" + "11" * 32,
                    event_log=[EventLogEntry(pcr=23, digest=d, type=t, description=s)
                               for t, s, d in events])


def server(tmp_path: Path, **config: object) -> RemsServer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "token").write_text("t" * 32)
    rems = RemsServer(RemsConfig(**{  # type: ignore[arg-type]
        "database": f"sqlite:///{tmp_path / 'rems.db'}", "admin_token_file": tmp_path / "token",
        "signing_key": tmp_path / "ear.key", "http_tls": False,
        "golden_pcrs": {"17": LAUNCH.hex()}, **config}))
    rems.store.enroll("avm1", AK.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        None)
    rems.store.bind("cvm1", "avm1")
    for kind, subject, digest in EVENTS:
        rems.store.set_reference("avm" if kind.startswith("agent") else "cvm", subject, kind,
                                 digest)
    return rems


NONCE = bytes(range(32))


def handshake(rems: RemsServer, att: Attestation | None = None, nonce: bytes = NONCE,
              **kw: object) -> tuple[bool, str]:
    att = att or Attestation("avm1")
    got = rems.verify_evidence(att, HELLO, nonce, evidence(nonce, **kw))  # type: ignore[arg-type]
    return got.ok, got.reason


def test_a_genuine_believable_handshake(tmp_path: Path) -> None:
    rems = server(tmp_path)
    att = Attestation("avm1")
    assert handshake(rems, att) == (True, "ok")
    assert att.verified
    assert rems._evidence[-1][1].status == "pass"
    assert rems.store.counters("avm1") is not None


@pytest.mark.parametrize(("kw", "needle"), [
    ({"safe": 0}, "not safe"),
    ({"launch": b"\x01" * 32}, "launch PCR 17 is not the golden value"),
    ({"events": [*EVENTS[:3], ("baseline", "cvm1", "ee" * 32)]},
     "baseline of cvm1 is not the approved one"),
    ({"events": EVENTS[:3]}, "did not measure the baseline of cvm1"),
    ({"events": [*EVENTS, ("profile", "cvm2", "c2" * 32)]}, "which the A-VM did not name"),
    ({"events": [*EVENTS, ("kernel-module", "cvm1", "c2" * 32)]}, "unknown event type"),
])
def test_unbelievable_handshakes_are_refused(tmp_path: Path, kw: dict[str, object],
                                             needle: str) -> None:
    rems = server(tmp_path)
    ok, reason = handshake(rems, **kw)
    assert not ok
    assert needle in reason
    # The C-VM it guards turns untrusted with that reason, not just "no report".
    cvm, result = rems._evidence[-1]
    assert (cvm, result.status) == ("cvm1", "fail")
    assert needle in str(result.error)


def test_tpm_counters_never_go_back_across_rems_restarts(tmp_path: Path) -> None:
    rems = server(tmp_path)
    assert handshake(rems, clock=9000, reset=3, restart=2)[0]
    again = RemsServer(rems.config)  # a restarted REM-S remembers the AK's counters
    for kw, needle in [({"clock": 9000, "reset": 2, "restart": 2}, "resetCount went back"),
                       ({"clock": 9500, "reset": 3, "restart": 1}, "restartCount went back"),
                       ({"clock": 8000, "reset": 3, "restart": 2}, "clock went back")]:
        ok, reason = handshake(again, **kw)  # type: ignore[arg-type]
        assert not ok
        assert needle in reason
    assert handshake(again, clock=9100, reset=3, restart=2)[0]
    # A reset (an orderly reboot of the A-VM's TPM: its clock runs on) is believed in a
    # handshake, and on the record; one whose clock fell back is not.
    ok, reason = handshake(again, clock=100, reset=4, restart=0)
    assert not ok
    assert "clock went back" in reason
    assert handshake(again, clock=9300, reset=4, restart=0)[0]
    assert ("tpm-reset", "avm1") in [(k, s) for k, s, _ in again._audits]


def test_report_quotes_must_keep_the_handshakes_pcrs_and_tpm_epoch(tmp_path: Path) -> None:
    rems = server(tmp_path)
    att = Attestation("avm1")
    assert handshake(rems, att, clock=5000)[0]
    digest = hashlib.sha256(b"report").digest()
    ok = rems.verify_report_quote(att, NONCE, digest, quote(
        hashlib.sha256(NONCE + digest).digest(), clock=5100))
    assert ok.ok, ok.reason
    changed = rems.verify_report_quote(att, NONCE, digest, quote(
        hashlib.sha256(NONCE + digest).digest(), clock=5200,
        events=[*EVENTS[:3], ("baseline", "cvm1", "ee" * 32)]))
    assert not changed.ok
    assert "PCR 23 changed since the handshake" in changed.reason
    assert not att.verified  # nothing more on that channel is believed

    att = Attestation("avm1")
    assert handshake(rems, att, clock=6000)[0]
    reset = rems.verify_report_quote(att, NONCE, digest, quote(
        hashlib.sha256(NONCE + digest).digest(), clock=6100, reset=4))
    assert not reset.ok
    assert "a new handshake is needed" in reset.reason


def test_evidence_relayed_from_another_tls_channel_is_refused(tmp_path: Path) -> None:
    """The quote covers the nonce bound to the channel it was made for."""
    rems = server(tmp_path)
    nonce = bytes(range(32))
    made_for = bind_nonce(nonce, b"the A-VM's own TLS channel")
    relayed_to = bind_nonce(nonce, b"the relay's TLS channel to the REM-S")
    got = rems.verify_evidence(Attestation("avm1"), HELLO, relayed_to, evidence(made_for))
    assert not got.ok
    assert "nonce" in got.reason.lower() or "extradata" in got.reason.lower()


def test_no_golden_values_no_trust_unless_insecure_lab(tmp_path: Path) -> None:
    strict = server(tmp_path / "a", golden_pcrs={})
    ok, reason = handshake(strict)
    assert not ok
    assert "no golden PCR 17" in reason
    with strict.store.engine.begin() as conn:
        conn.execute(schema.references.delete())
    lab = RemsServer(strict.config.model_copy(update={"insecure_lab": True}))
    assert handshake(lab) == (True, "ok")  # taken without references, and said so
    refs = server(tmp_path / "b")
    with refs.store.engine.begin() as conn:
        conn.execute(schema.references.delete())
    ok, reason = handshake(refs)
    assert not ok
    assert "no approved agent-code digest" in reason


def test_a_hello_for_a_cvm_bound_elsewhere_is_refused_and_audited(tmp_path: Path) -> None:
    rems = server(tmp_path)
    rems.store.bind("cvm9", "avm2")
    rogue = Hello(avm_id="avm1", cvms=["cvm1", "cvm9"], capabilities=HELLO.capabilities)
    got = rems.authorize(rogue)
    assert not got.ok
    assert "cvm9" in got.reason
    assert "avm2" not in got.reason  # nothing said of who guards it
    assert rems._audits[-1][:2] == ("refused", "avm1")
    assert rems.authorize(HELLO).ok
    with rems.store.engine.connect() as conn:
        assert conn.execute(select(schema.reports)).all() == []


def test_a_replayed_earlier_quote_is_refused(tmp_path: Path) -> None:
    """A genuine handshake quote of an earlier session, presented again."""
    rems = server(tmp_path)
    earlier = evidence(bind_nonce(bytes(32), b"session 1"))
    assert rems.verify_evidence(Attestation("avm1"), HELLO, bind_nonce(bytes(32), b"session 1"),
                                earlier).ok
    again = rems.verify_evidence(Attestation("avm1"), HELLO,
                                 bind_nonce(bytes(range(32)), b"session 2"), earlier)
    assert not again.ok
    assert "nonce" in again.reason.lower()
