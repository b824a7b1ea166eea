"""The REM-S store on a real, private PostgreSQL server (tests/pg.py).

The SQLite unit tests' engine-independent behaviours run here again (imported,
so they use this module's ``store`` fixture), plus what only a shared server
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

# The test_* names: the SQLite unit tests' engine-independent behaviours, collected
# again here so that they run with this module's PostgreSQL ``store`` fixture.
from tests.unit.test_rems_store import (
    append_concurrently,
    test_a_batch_is_stored_whole_or_not_at_all,  # noqa: F401
    test_audit_chain_detects_a_removed_entry,  # noqa: F401
    test_audit_chain_verifies_and_detects_tampering,  # noqa: F401
    test_policies_are_versioned_by_content,  # noqa: F401
    test_reports_are_unique_per_sequence,  # noqa: F401
    test_verdicts_upsert,  # noqa: F401
)
from vims.rems.store import Store

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
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"
    again.close()


def test_plain_postgresql_url_uses_psycopg3(url: str) -> None:
    st = Store(url.replace("postgresql+psycopg://", "postgresql://"))
    assert st.engine.dialect.driver == "psycopg"
    st.close()


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
