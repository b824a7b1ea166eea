"""Signed audit checkpoints against an insider who can write the REM-S database.

The hash chain alone catches an edited or removed entry in the middle. What it
cannot catch, and the tests below attack, is an insider who cuts off the newest
entries (and the checkpoints that covered them), or who edits an old entry and
recomputes every hash after it. Signed checkpoints, and their copy in an
append-only file outside the database, catch both.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import delete, select, text, update

from vims.rems import audit, ear
from vims.rems import schema as s
from vims.rems.store import GENESIS, Store, chain_hash

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())
ISSUER = "https://rems.lab.example:8080"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'rems.db'}")


def reports(store: Store, first: int, last: int) -> None:
    for seq in range(first, last + 1):
        store.add_report("cvm1", "avm1", seq, GENESIS, {"result": "pass", "n": seq})


def audit_ids(store: Store) -> list[int]:
    with store.engine.connect() as conn:
        return [int(r[0]) for r in conn.execute(select(s.audit.c.id).order_by(s.audit.c.id))]


def truncate_log(store: Store, n: int) -> None:
    """The insider deletes the newest n audit entries."""
    with store.engine.begin() as conn:
        for i in audit_ids(store)[-n:]:
            conn.execute(delete(s.audit).where(s.audit.c.id == i))


def drop_checkpoints_after(store: Store, audit_id: int) -> None:
    """... and the checkpoints that covered them."""
    with store.engine.begin() as conn:
        conn.execute(delete(s.audit_checkpoints)
                     .where(s.audit_checkpoints.c.audit_id > audit_id))


def rechain(store: Store, edit_id: int) -> None:
    """The insider edits one entry and recomputes every hash from there on."""
    with store.engine.begin() as conn:
        rows = conn.execute(select(s.audit).order_by(s.audit.c.id)).all()
        prev = GENESIS
        for row in rows:
            payload = json.loads(row.payload)
            if row.id == edit_id:
                payload["digest"] = "00" * 32  # a report that never was
            if row.id >= edit_id:
                entry = {"ts": row.ts, "kind": row.kind, "subject": row.subject,
                         "payload": payload}
                digest = chain_hash(prev, entry)
                conn.execute(update(s.audit).where(s.audit.c.id == row.id).values(
                    payload=json.dumps(payload, sort_keys=True, separators=(",", ":")),
                    prev_hash=prev, hash=digest))
                prev = digest
            else:
                prev = row.hash


# -------------------------------------------------------------------------- clean
def test_a_clean_chain_with_checkpoints_verifies(store: Store, tmp_path: Path) -> None:
    cps = tmp_path / "checkpoints.jwt"
    assert audit.checkpoint(store, KEY, ISSUER, cps) is None  # nothing to sign yet
    reports(store, 1, 4)
    first = audit.checkpoint(store, KEY, ISSUER, cps)
    assert first is not None
    assert first.entries == 4
    assert audit.checkpoint(store, KEY, ISSUER, cps) is None  # the tail has not moved
    reports(store, 5, 7)
    second = audit.checkpoint(store, KEY, ISSUER, cps)
    assert second is not None
    assert (second.entries, second.audit_id) == (7, audit_ids(store)[-1])
    reports(store, 8, 9)  # not yet signed
    result = audit.verify(store, KEY.public_key(), cps)
    assert result.ok, result.reason
    assert (result.entries, result.checkpoints, result.file_checkpoints) == (9, 2, 2)
    assert (result.signed_entries, result.unsigned_entries) == (7, 2)
    assert result.signatures_checked
    assert cps.read_text().splitlines() == [first.token, second.token]
    # The token is an ES256 JWS that names the chain head it signs and its predecessor.
    claims = audit.decode_checkpoint(second.token, KEY.public_key())
    assert (claims["audit_id"], claims["hash"], claims["entries"]) == (
        second.audit_id, second.hash, 7)
    assert claims["prev_checkpoint_hash"] == audit.token_hash(first.token)
    assert "prev_checkpoint_hash" not in audit.decode_checkpoint(first.token, KEY.public_key())
    assert claims["iss"] == ISSUER


def test_verify_accepts_the_published_jwks(store: Store) -> None:
    reports(store, 1, 3)
    audit.checkpoint(store, KEY, ISSUER)
    from vims.rems import jws
    assert audit.verify(store, jws.keys_from_jwks(ear.jwks(KEY.public_key()))).ok


# --------------------------------------------------------------------- truncation
def test_truncating_the_log_alone_is_detected(store: Store) -> None:
    reports(store, 1, 6)
    audit.checkpoint(store, KEY, ISSUER)
    last = audit_ids(store)[-1]
    truncate_log(store, 2)
    assert store.verify_audit().ok  # the chain alone sees nothing wrong
    result = audit.verify(store, KEY.public_key())
    assert not result.ok
    assert result.first_bad_id == last
    assert "truncated" in result.reason
    assert "\n" not in result.reason


def test_truncating_the_log_and_its_checkpoints_is_caught_by_the_file(
        store: Store, tmp_path: Path) -> None:
    cps = tmp_path / "checkpoints.jwt"
    reports(store, 1, 3)
    kept = audit.checkpoint(store, KEY, ISSUER, cps)
    assert kept is not None
    reports(store, 4, 8)
    audit.checkpoint(store, KEY, ISSUER, cps)
    truncate_log(store, 5)
    drop_checkpoints_after(store, kept.audit_id)
    # From inside the database the cut is invisible: that is what the file is for.
    assert audit.verify(store, KEY.public_key()).ok
    result = audit.verify(store, KEY.public_key(), cps)
    assert not result.ok
    assert "truncated" in result.reason
    assert str(cps) in result.reason
    assert "\n" not in result.reason


def test_appending_after_a_truncation_does_not_hide_it(store: Store, tmp_path: Path) -> None:
    """SQLite reuses the ids of deleted tail rows: new entries take the old ids."""
    cps = tmp_path / "checkpoints.jwt"
    reports(store, 1, 3)
    kept = audit.checkpoint(store, KEY, ISSUER, cps)
    assert kept is not None
    reports(store, 4, 6)
    audit.checkpoint(store, KEY, ISSUER, cps)
    truncate_log(store, 3)
    drop_checkpoints_after(store, kept.audit_id)
    reports(store, 7, 9)  # the REM-S carries on: same ids, other hashes
    result = audit.verify(store, KEY.public_key(), cps)
    assert not result.ok
    assert "re-written" in result.reason or "truncated" in result.reason


def test_checkpoint_refuses_to_sign_over_a_truncation_it_can_see(
        store: Store, tmp_path: Path) -> None:
    cps = tmp_path / "checkpoints.jwt"
    reports(store, 1, 3)
    kept = audit.checkpoint(store, KEY, ISSUER, cps)
    assert kept is not None
    reports(store, 4, 6)
    audit.checkpoint(store, KEY, ISSUER, cps)
    truncate_log(store, 3)
    drop_checkpoints_after(store, kept.audit_id)
    reports(store, 7, 9)
    with pytest.raises(audit.AuditBroken, match="not in the database"):
        audit.checkpoint(store, KEY, ISSUER, cps)
    truncate_log(store, 4)  # without the file: the entry the last checkpoint signed is gone
    with pytest.raises(audit.AuditBroken, match="truncated"):
        audit.checkpoint(store, KEY, ISSUER)


# ---------------------------------------------------------------------- re-chaining
def test_a_rechained_log_is_detected(store: Store) -> None:
    reports(store, 1, 5)
    audit.checkpoint(store, KEY, ISSUER)
    reports(store, 6, 8)
    audit.checkpoint(store, KEY, ISSUER)
    victim = audit_ids(store)[2]
    rechain(store, victim)
    assert store.verify_audit().ok  # every hash recomputed: the chain links up
    result = audit.verify(store, KEY.public_key())
    assert not result.ok
    assert "re-written" in result.reason
    assert "\n" not in result.reason
    assert result.first_bad_id == audit_ids(store)[4]  # the first signed head it broke


def test_checkpoint_refuses_to_sign_a_chain_that_does_not_link(store: Store) -> None:
    reports(store, 1, 3)
    audit.checkpoint(store, KEY, ISSUER)
    reports(store, 4, 6)
    with store.engine.begin() as conn:  # an unsigned entry is edited
        conn.execute(text("UPDATE audit SET subject = 'cvm2' WHERE id = :i"),
                     {"i": audit_ids(store)[-1]})
    with pytest.raises(audit.AuditBroken, match="altered"):
        audit.checkpoint(store, KEY, ISSUER)
    rechain(store, audit_ids(store)[1])  # a signed entry, re-chained
    with pytest.raises(audit.AuditBroken, match="no longer"):
        audit.checkpoint(store, KEY, ISSUER)


# ---------------------------------------------------------------------- forgery
def test_a_forged_checkpoint_is_detected(store: Store, tmp_path: Path) -> None:
    reports(store, 1, 4)
    audit.checkpoint(store, KEY, ISSUER)
    rechain(store, audit_ids(store)[1])
    # The insider covers the re-chained log with checkpoints of their own.
    with store.engine.begin() as conn:
        conn.execute(delete(s.audit_checkpoints))
    audit.checkpoint(store, OTHER, ISSUER)
    result = audit.verify(store, KEY.public_key())
    assert not result.ok
    assert "signature" in result.reason
    assert "\n" not in result.reason


def test_an_edited_checkpoint_row_is_detected(store: Store) -> None:
    reports(store, 1, 4)
    audit.checkpoint(store, KEY, ISSUER)
    rechain(store, audit_ids(store)[1])
    with store.engine.begin() as conn:  # the row's columns follow the new chain...
        conn.execute(update(s.audit_checkpoints).values(
            hash=conn.execute(select(s.audit.c.hash).order_by(s.audit.c.id.desc())
                              .limit(1)).scalar()))
    result = audit.verify(store, KEY.public_key())  # ...its signed token does not
    assert not result.ok
    assert "token" in result.reason


def test_a_forged_line_in_the_file_is_detected(store: Store, tmp_path: Path) -> None:
    cps = tmp_path / "checkpoints.jwt"
    reports(store, 1, 2)
    audit.checkpoint(store, KEY, ISSUER, cps)
    reports(store, 3, 4)
    forged = audit.checkpoint(store, OTHER, ISSUER)
    assert forged is not None
    with cps.open("a") as f:
        f.write(forged.token + "\n")
    result = audit.verify(store, KEY.public_key(), cps)
    assert not result.ok
    assert "signature" in result.reason


def test_deleted_checkpoints_in_the_middle_are_detected(store: Store) -> None:
    for i in range(3):
        reports(store, 3 * i + 1, 3 * i + 3)
        audit.checkpoint(store, KEY, ISSUER)
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_checkpoints WHERE id = 2"))
    result = audit.verify(store, KEY.public_key())
    assert not result.ok
    assert "checkpoint" in result.reason
    assert "missing" in result.reason


def test_a_torn_last_line_is_a_note_not_a_break(store: Store, tmp_path: Path) -> None:
    """A crash in the middle of an append leaves half a line; the next append goes on."""
    cps = tmp_path / "checkpoints.jwt"
    reports(store, 1, 2)
    cp = audit.checkpoint(store, KEY, ISSUER, cps)
    assert cp is not None
    with cps.open("a") as f:
        f.write(cp.token[:40])
    reports(store, 3, 4)
    assert audit.checkpoint(store, KEY, ISSUER, cps) is not None
    result = audit.verify(store, KEY.public_key(), cps)
    assert result.ok, result.reason
    assert result.file_checkpoints == 2
    assert any("unreadable" in n for n in result.notes)


# ------------------------------------------------------------------- concurrency
def test_concurrent_checkpoints_stay_one_monotonic_sequence(store: Store, tmp_path: Path) -> None:
    cps = tmp_path / "checkpoints.jwt"
    errors: list[BaseException] = []

    def writer(cvm: str) -> None:
        try:
            for seq in range(1, 15):
                store.add_report(cvm, "avm1", seq, GENESIS, {"result": "pass"})
                audit.checkpoint(store, KEY, ISSUER, cps)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"cvm{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = audit.verify(store, KEY.public_key(), cps)
    assert result.ok, result.reason
    assert result.unsigned_entries == 0


def test_checkpoint_loop_signs_off_the_event_loop(store: Store, tmp_path: Path) -> None:
    cps = tmp_path / "checkpoints.jwt"

    async def run() -> None:
        task = asyncio.create_task(audit.checkpoint_loop(store, KEY, ISSUER, cps, 0.02))
        for seq in range(1, 4):
            await asyncio.to_thread(store.add_report, "cvm1", "avm1", seq, GENESIS, {})
            await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    result = audit.verify(store, KEY.public_key(), cps)
    assert result.ok
    assert result.checkpoints >= 2
    assert result.unsigned_entries == 0


# ---------------------------------------------------------------------------- CLI
def _config(tmp_path: Path, *, checkpoints: Path | None = None) -> Path:
    key = tmp_path / "ear.key"
    key.write_bytes(KEY.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    (tmp_path / "admin.token").write_text("a" * 32)
    cfg = tmp_path / "rems.toml"
    cfg.write_text(f'[rems]\ndatabase = "sqlite:///{tmp_path / "rems.db"}"\n'
                   f'signing_key = "{key}"\nadmin_token_file = "{tmp_path / "admin.token"}"\n'
                   "http_tls = false\n"
                   + (f'audit_checkpoint_file = "{checkpoints}"\n' if checkpoints else ""))
    return cfg


def vims(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vims.cli", "rems", "audit", "verify", *args],
                          capture_output=True, text=True, check=False)


def test_cli_audit_verify_with_the_config_key(store: Store, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    reports(store, 1, 3)
    ok = vims("--config", str(cfg))  # no checkpoint yet: the chain alone, as before
    assert (ok.returncode, ok.stdout.strip()) == (0, "audit log intact: 3 entries"), ok.stderr
    cps = tmp_path / "checkpoints.jwt"
    audit.checkpoint(store, KEY, ISSUER, cps)
    reports(store, 4, 4)
    ok = vims("--config", str(cfg), "--checkpoints", str(cps), "--format", "json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out = json.loads(ok.stdout)
    assert (out["ok"], out["entries"], out["checkpoints"], out["file_checkpoints"],
            out["unsigned_entries"], out["signatures_checked"]) == (True, 4, 1, 1, 1, True)
    text_out = vims("--config", str(cfg), "--checkpoints", str(cps)).stdout
    assert text_out.splitlines()[0] == "audit log intact: 4 entries"
    assert "1 signed checkpoint" in text_out
    assert "1 entry after it unsigned" in text_out
    # The config's checkpoint file is the default.
    with_file = json.loads(vims("--config", str(_config(tmp_path, checkpoints=cps)),
                                "--format", "json").stdout)
    assert (with_file["ok"], with_file["file_checkpoints"]) == (True, 1)
    truncate_log(store, 2)
    broken = vims("--config", str(cfg), "--checkpoints", str(cps))
    assert broken.returncode == 1
    assert "BROKEN" in broken.stdout
    assert "truncated" in broken.stdout


def test_a_deleted_checkpoint_file_is_reported(store: Store, tmp_path: Path) -> None:
    cps = tmp_path / "checkpoints.jwt"
    reports(store, 1, 2)
    audit.checkpoint(store, KEY, ISSUER, cps)
    cps.unlink()
    result = audit.verify(store, KEY.public_key(), cps)
    assert not result.ok
    assert "gone" in result.reason
    fresh = Store(f"sqlite:///{tmp_path / 'fresh.db'}")  # nothing signed yet: no file yet
    assert audit.verify(fresh, KEY.public_key(), tmp_path / "none.jwt").ok


def test_cli_audit_verify_with_a_jwks_or_a_public_key(store: Store, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rems.db'}"
    reports(store, 1, 3)
    audit.checkpoint(store, KEY, ISSUER)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(ear.jwks(KEY.public_key())))
    pem = tmp_path / "rems.pub"
    pem.write_bytes(KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert vims("--database", url, "--jwks", str(jwks)).returncode == 0
    assert vims("--database", url, "--public-key", str(pem)).returncode == 0
    other = tmp_path / "other.pub"
    other.write_bytes(OTHER.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    forged = vims("--database", url, "--public-key", str(other))
    assert forged.returncode == 1
    assert "signature" in forged.stdout
    unchecked = vims("--database", url, "--format", "json")  # no key: said so, not failed
    assert unchecked.returncode == 0
    assert json.loads(unchecked.stdout)["signatures_checked"] is False
    jwks.write_text("{not json")
    bad = vims("--database", url, "--jwks", str(jwks))
    assert bad.returncode == 2
    assert bad.stderr.startswith("vims: error:")
    assert len(bad.stderr.strip().splitlines()) == 1
    assert vims("--database", url, "--public-key", str(tmp_path / "nope.pem")).returncode == 2
