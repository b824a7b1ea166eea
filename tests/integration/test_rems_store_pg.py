"""The REM-S store on a real, private PostgreSQL server (tests/pg.py).

The same behaviours as the SQLite unit tests, plus what only a shared server
shows: several REM-S instances opening and writing one database at once.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text

from tests.pg import PrivatePostgres, private_postgres
from tests.unit.test_rems_store import append_concurrently
from vims.rems.store import GENESIS, DuplicateReport, Store, StoreError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[PrivatePostgres]:
    with private_postgres() as srv:
        yield srv


@pytest.fixture
def url(server: PrivatePostgres) -> str:
    """A fresh, empty database per test."""
    return server.new_database()


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    st = Store(url)
    yield st
    st.close()


def test_migrations_are_idempotent(store: Store, url: str) -> None:
    store.put_policy("lab", {"checks": ["kernel.text"]})
    again = Store(url)  # a restart: migrate is a no-op
    assert again.get_policy("lab") == (1, {"checks": ["kernel.text"]})
    with again.engine.connect() as conn:
        assert conn.dialect.name == "postgresql"
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"
    again.close()


def test_plain_postgresql_url_uses_psycopg3(url: str) -> None:
    st = Store(url.replace("postgresql+psycopg://", "postgresql://"))
    assert st.engine.dialect.driver == "psycopg"
    st.close()


def test_policies_are_versioned_by_content(store: Store) -> None:
    assert store.put_policy("lab", {"a": 1}) == (True, 1)
    assert store.put_policy("lab", {"a": 1}) == (False, 1)
    assert store.put_policy("lab", {"a": 2}) == (True, 2)
    assert store.assign("cvm1", "lab") is True
    assert store.assign("cvm1", "lab") is False
    assert store.policy_of("cvm1") == "lab"
    with pytest.raises(StoreError, match="no policy"):
        store.assign("cvm1", "missing")
    assert store.assign("cvm2", "lab") is True  # the store is still usable after the error


def test_reports_are_unique_per_sequence(store: Store) -> None:
    d1 = store.add_report("cvm1", "avm1", 1, GENESIS, {"result": "pass", "n": 1})
    store.add_report("cvm1", "avm1", 2, d1, {"result": "fail", "n": 2})
    with pytest.raises(DuplicateReport):
        store.add_report("cvm1", "avm1", 2, d1, {"result": "pass", "n": 2})
    # The aborted transaction left nothing behind and the next write works.
    store.add_report("cvm1", "avm1", 3, d1, {"result": "pass", "n": 3})
    assert store.last_seq("cvm1") == 3
    assert store.last_seq("cvm2") == 0
    got = store.reports("cvm1")
    assert [r["seq"] for r in got] == [3, 2, 1]
    assert got[2]["digest"] == d1
    assert got[1]["report"] == {"result": "fail", "n": 2}
    check = store.verify_audit()
    assert (check.ok, check.entries) == (True, 3)  # no audit entry for the refused replay


def test_verdicts_upsert(store: Store) -> None:
    store.put_verdict("cvm1", "affirming", {"executables": 2}, "e.y.z", 10.0, 40.0, 1)
    store.put_verdict("cvm1", "contraindicated", {"executables": 96}, "e.y.w", 11.0, 41.0, 2)
    v = store.verdict("cvm1")
    assert v is not None
    assert (v["status"], v["vector"], v["report_seq"], v["ear"]) == (
        "contraindicated", {"executables": 96}, 2, "e.y.w")
    assert (v["issued_at"], v["expires_at"]) == (11.0, 41.0)
    assert store.verdict("nope") is None
    assert store.cvms() == ["cvm1"]


def test_audit_timestamps_round_trip_exactly(store: Store) -> None:
    """The chain hashes ``ts`` as a float: the column must give back the very same double."""
    for i in range(50):
        store.enroll(f"avm{i}", f"ak{i}", None)
    with store.engine.connect() as conn:
        assert conn.execute(text(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_name = 'audit' AND column_name = 'ts'")).scalar() == "double precision"
        for ts in conn.execute(text("SELECT ts FROM audit")).scalars():
            assert struct.pack("<d", ts) == struct.pack("<d", float(repr(ts)))
    assert store.verify_audit().ok


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


def test_instances_starting_together_migrate_once(url: str) -> None:
    """Several REM-S instances opening a fresh database at the same moment."""
    start = threading.Barrier(4)

    def open_store() -> Store:
        start.wait()
        return Store(url)

    with ThreadPoolExecutor(4) as pool:  # .result() re-raises a worker's error
        stores = [f.result() for f in [pool.submit(open_store) for _ in range(4)]]
    assert stores[0].put_policy("lab", {"a": 1}) == (True, 1)
    for st in stores:
        st.close()


def test_two_instances_append_concurrently(url: str) -> None:
    """Empty audit table at the start: FOR UPDATE alone would lock nothing there."""
    append_concurrently(url)
