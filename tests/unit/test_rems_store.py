"""The REM-S store on a real SQLite file: migrations, idempotence, replays, audit chain."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from vims.rems.store import GENESIS, DuplicateReport, NewReport, Store, StoreError
from vims.rems.verdict import Verdict


def verdict(status: str, vector: dict[str, int], expires_at: float, seq: int) -> Verdict:
    return Verdict(status, vector, [], {}, expires_at, None, "policy:lab@1", seq)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'rems.db'}")


def test_migrations_are_idempotent_and_sqlite_runs_in_wal(store: Store, tmp_path: Path) -> None:
    store.put_policy("lab", {"checks": ["kernel.text"]})
    again = Store(f"sqlite:///{tmp_path / 'rems.db'}")  # a restart: migrate is a no-op
    assert again.get_policy("lab") == (1, {"checks": ["kernel.text"]})
    with again.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"


def test_a_0001_database_upgrades_with_its_verdicts(tmp_path: Path) -> None:
    """A REM-S database from before lazy EARs keeps its verdicts and takes new ones."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("vims.rems") / "migrations"))
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("INSERT INTO verdicts VALUES ('old', 'affirming', '{}', 'e.y.z', "
                          "1.0, 2.0, 7)"))
    engine.dispose()
    store = Store(url)
    assert store.verdict("old") == {"cvm": "old", "status": "affirming", "vector": {},
                                    "issued_at": 1.0, "expires_at": 2.0, "report_seq": 7,
                                    "policy_id": None, "stale_check": None, "checks": {},
                                    "reasons": []}
    store.put_verdict("new", verdict("warning", {"executables": 32}, 4.0, 1), 3.0)
    assert store.verdict("new") is not None


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


def judge(cvm: str, results: object, view: object, now: float) -> Verdict:
    return {"a": verdict("affirming", {"executables": 2}, 9.0, 2),
            "b": verdict("contraindicated", {"executables": 96}, 9.0, 1),
            "c": verdict("affirming", {}, 9.0, 1)}[cvm]


def test_a_batch_is_stored_whole_or_not_at_all(store: Store) -> None:
    digests = store.ingest(
        [NewReport("a", "avm1", 1, GENESIS, {"result": "pass"}),
         NewReport("b", "avm1", 1, GENESIS, {"result": "fail"}, digest="ab" * 32),
         NewReport("a", "avm1", 2, GENESIS, {"result": "pass"})], judge).digests
    assert digests[1] == "ab" * 32
    assert [r["seq"] for r in store.reports("a")] == [2, 1]
    assert store.verdict("b")["status"] == "contraindicated"  # type: ignore[index]
    check = store.verify_audit()
    assert (check.ok, check.entries) == (True, 5)  # 3 reports + 2 verdicts, one chain
    # One replayed report in a batch: none of the batch is kept, the chain is intact.
    with pytest.raises(DuplicateReport, match="already stored"):
        store.ingest([NewReport("c", "avm1", 1, GENESIS, {"result": "pass"}),
                      NewReport("a", "avm1", 2, GENESIS, {"result": "pass"})], judge)
    assert store.reports("c") == []
    assert store.verdict("c") is None
    assert store.verify_audit().entries == 5


def test_verdicts_upsert(store: Store) -> None:
    store.put_verdict("cvm1", verdict("affirming", {"executables": 2}, 40.0, 1), 10.0)
    store.put_verdict("cvm1", verdict("contraindicated", {"executables": 96}, 41.0, 2), 11.0)
    v = store.verdict("cvm1")
    assert v is not None
    assert (v["status"], v["vector"], v["report_seq"]) == (
        "contraindicated", {"executables": 96}, 2)
    assert (v["issued_at"], v["expires_at"]) == (11.0, 41.0)
    assert store.verdict("nope") is None
    assert store.cvms() == ["cvm1"]


def test_audit_chain_verifies_and_detects_tampering(store: Store) -> None:
    store.put_policy("lab", {"a": 1})
    store.add_report("cvm1", "avm1", 1, GENESIS, {"result": "pass"})
    store.put_verdict("cvm1", verdict("affirming", {"executables": 2}, 2.0, 1), 1.0)
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


def test_cli_audit_verify(store: Store, tmp_path: Path) -> None:
    import subprocess
    import sys

    store.put_policy("lab", {"a": 1})
    store.add_report("cvm1", "avm1", 1, GENESIS, {"result": "pass"})
    url = f"sqlite:///{tmp_path / 'rems.db'}"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vims.cli", "rems", "audit", "verify",
                               "--database", url], capture_output=True, text=True, check=False)

    ok = run()
    assert (ok.returncode, ok.stdout.strip()) == (0, "audit log intact: 2 entries")
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE audit SET subject = 'cvm2' WHERE id = 2"))
    broken = run()
    assert broken.returncode == 1
    assert "BROKEN at entry 2" in broken.stdout


def append_concurrently(url: str, rounds: int = 200) -> None:
    """Two REM-S instances on one database write at once; nothing is lost or forked.

    Each instance stores its own reports, races the other for the same shared
    reports (a replay across instances: exactly one wins) and upserts the same
    verdict; afterwards every report is stored once and the audit chain verifies.
    """
    stores = [Store(url), Store(url)]
    start = threading.Barrier(len(stores))

    def work(i: int) -> int:
        store, won = stores[i], 0
        start.wait()
        for seq in range(1, rounds + 1):
            store.add_report(f"own{i}", f"avm{i}", seq, GENESIS, {"result": "pass"})
            try:
                store.add_report("shared", f"avm{i}", seq, GENESIS, {"by": i})
                won += 1
            except DuplicateReport:
                pass
            store.put_verdict("shared", verdict("affirming", {"executables": 2},
                                                float(seq) + 30, seq), float(seq))
        return won

    with ThreadPoolExecutor(len(stores)) as pool:  # .result() re-raises a worker's error
        won = [f.result() for f in [pool.submit(work, i) for i in range(len(stores))]]
    assert sum(won) == rounds
    for cvm in ("own0", "own1", "shared"):
        assert [r["seq"] for r in stores[0].reports(cvm, limit=10 * rounds)] == \
            list(range(rounds, 0, -1))
    check = stores[1].verify_audit()
    assert check.ok, check
    assert check.entries == 3 * rounds + 2 * rounds  # 3 x rounds reports, 2 x rounds verdicts
    for store in stores:
        store.close()


def test_two_instances_append_concurrently_on_sqlite_wal(tmp_path: Path) -> None:
    append_concurrently(f"sqlite:///{tmp_path / 'rems.db'}")
