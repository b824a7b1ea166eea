"""The REM-S store on a real SQLite file: migrations, idempotence, replays, audit chain."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from vims.rems.store import GENESIS, DuplicateReport, Store, StoreError


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'rems.db'}")


def test_migrations_are_idempotent_and_sqlite_runs_in_wal(store: Store, tmp_path: Path) -> None:
    store.put_policy("lab", {"checks": ["kernel.text"]})
    again = Store(f"sqlite:///{tmp_path / 'rems.db'}")  # a restart: migrate is a no-op
    assert again.get_policy("lab") == (1, {"checks": ["kernel.text"]})
    with again.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"


def test_policies_are_versioned_by_content(store: Store) -> None:
    assert store.put_policy("lab", {"a": 1}) == (True, 1)
    assert store.put_policy("lab", {"a": 1}) == (False, 1)
    assert store.put_policy("lab", {"a": 2}) == (True, 2)
    assert store.assign("cvm1", "lab") is True
    assert store.assign("cvm1", "lab") is False
    assert store.policy_of("cvm1") == "lab"
    with pytest.raises(StoreError, match="no policy"):
        store.assign("cvm1", "missing")


def test_reports_are_unique_per_sequence(store: Store) -> None:
    d1 = store.add_report("cvm1", "avm1", 1, GENESIS, {"result": "pass", "n": 1})
    store.add_report("cvm1", "avm1", 2, d1, {"result": "fail", "n": 2})
    with pytest.raises(DuplicateReport):
        store.add_report("cvm1", "avm1", 2, d1, {"result": "pass", "n": 2})
    assert store.last_seq("cvm1") == 2
    assert store.last_seq("cvm2") == 0
    got = store.reports("cvm1")
    assert [r["seq"] for r in got] == [2, 1]
    assert got[1]["digest"] == d1
    assert got[0]["prev_hash"] == d1
    assert got[0]["report"] == {"result": "fail", "n": 2}


def test_verdicts_upsert(store: Store) -> None:
    store.put_verdict("cvm1", "affirming", {"executables": 2}, "e.y.z", 10.0, 40.0, 1)
    store.put_verdict("cvm1", "contraindicated", {"executables": 96}, "e.y.w", 11.0, 41.0, 2)
    v = store.verdict("cvm1")
    assert v is not None
    assert (v["status"], v["vector"], v["report_seq"]) == ("contraindicated",
                                                           {"executables": 96}, 2)
    assert store.verdict("nope") is None
    assert store.cvms() == ["cvm1"]


def test_audit_chain_verifies_and_detects_tampering(store: Store) -> None:
    store.put_policy("lab", {"a": 1})
    store.add_report("cvm1", "avm1", 1, GENESIS, {"result": "pass"})
    store.put_verdict("cvm1", "affirming", {"executables": 2}, "t", 1.0, 2.0, 1)
    check = store.verify_audit()
    assert (check.ok, check.entries) == (True, 3)
    with store.engine.begin() as conn:  # an insider edits a verdict's audit entry
        conn.execute(text("UPDATE audit SET payload = replace(payload, 'affirming', "
                          "'contraindicated') WHERE kind = 'verdict'"))
    bad = store.verify_audit()
    assert (bad.ok, bad.first_bad_id, bad.reason) == (False, 3, "entry altered")


def test_audit_chain_detects_a_removed_entry(store: Store) -> None:
    for seq in (1, 2, 3):
        store.add_report("cvm1", "avm1", seq, GENESIS, {"result": "pass"})
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit WHERE id = 2"))
    bad = store.verify_audit()
    assert (bad.ok, bad.first_bad_id) == (False, 3)
    assert "missing" in bad.reason


def test_bad_database_url() -> None:
    with pytest.raises(StoreError):
        Store("nosuchdb://x")
