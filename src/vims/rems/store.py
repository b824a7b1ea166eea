"""REM-S storage behind one interface: SQLite (WAL) embedded, PostgreSQL shared.

SQLAlchemy Core gives one code path for both engines; Alembic migrates the
schema on open. Several REM-S instances can share a PostgreSQL database: every
write is a short transaction, report sequence numbers are unique per C-VM in
the schema (a replayed report fails the insert), and write transactions
serialize on one database-wide lock taken first (``pg_advisory_xact_lock`` on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so audit appends always extend the
committed tail, even when the audit table is still empty and ``FOR UPDATE``
would lock nothing. Every write appends to the one audit chain anyway, so the
lock costs no concurrency that the chain does not already forbid.

The audit log is append-only and hash-chained: each entry's hash covers the
previous entry's hash and the entry's canonical JSON, so an edited, removed or
reordered entry breaks the chain at that point (``verify_audit``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from vims.errors import VimsError
from vims.rems import schema as s

GENESIS = "0" * 64
# Key of the PostgreSQL advisory lock every REM-S write transaction holds ("vims").
WRITE_LOCK_KEY = 0x76696D73


class StoreError(VimsError):
    """The REM-S database cannot be used."""


class DuplicateReport(StoreError):
    """A report with this C-VM and sequence number is already stored (a replay)."""


def canonical(data: Any) -> bytes:
    """The one encoding hashed everywhere: sorted keys, no spaces, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(entry)).hexdigest()


@dataclass(frozen=True)
class NewReport:
    """A verified report to store: its chain position (from the control channel) and body."""

    cvm: str
    avm_id: str
    seq: int
    prev_hash: str
    body: dict[str, Any]
    digest: str | None = None


@dataclass(frozen=True)
class NewVerdict:
    cvm: str
    status: str
    vector: dict[str, int]
    issued_at: float
    expires_at: float
    report_seq: int | None


@dataclass(frozen=True)
class AuditCheck:
    ok: bool
    entries: int
    first_bad_id: int | None = None
    reason: str = ""


class Store:
    """The REM-S database; ``url`` is an SQLAlchemy URL (sqlite:///path or postgresql://)."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {}
        try:  # plain postgresql:// means psycopg 3, the driver VIMS ships (not psycopg2)
            parsed = make_url(url)
            if parsed.drivername in ("postgresql", "postgres"):
                url = parsed.set(drivername="postgresql+psycopg").render_as_string(
                    hide_password=False)
        except Exception as exc:  # an unparsable URL
            raise StoreError(f"bad database URL {url!r}: {exc}") from exc
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if url in ("sqlite://", "sqlite:///:memory:"):
                kwargs["poolclass"] = StaticPool
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except Exception as exc:  # bad URLs raise assorted errors
            raise StoreError(f"bad database URL {url!r}: {exc}") from exc
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        # Write transactions go through this view of the engine (same pool); see _write.
        self._writer: Engine = self.engine.execution_options(vims_write=True)
        self.migrate()

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(resources.files("vims.rems") / "migrations"))
        try:
            with self._write() as conn:  # instances starting together migrate one at a time
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except Exception as exc:  # driver errors vary by engine
            raise StoreError(f"cannot open or migrate {self.url}: {exc}") from exc

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction that first takes the database-wide REM-S write lock.

        Several instances share one audit chain, so appends must not interleave:
        PostgreSQL gets a transaction-level advisory lock (released by commit or
        rollback, also when a duplicate report aborts the transaction); SQLite
        opens with BEGIN IMMEDIATE (``_sqlite_begin``), which also spares WAL
        readers that later write the unretryable SQLITE_BUSY_SNAPSHOT.
        """
        with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": WRITE_LOCK_KEY})
            yield conn

    # ------------------------------------------------------------- policies
    def put_policy(self, name: str, body: dict[str, Any]) -> tuple[bool, int]:
        """Store a policy; returns (changed, version). Same content: no new version."""
        digest = hashlib.sha256(canonical(body)).hexdigest()
        with self._write() as conn:
            row = conn.execute(select(s.policies).where(s.policies.c.name == name)
                               .with_for_update()).first()
            if row is not None and row.digest == digest:
                return False, int(row.version)
            version = 1 if row is None else int(row.version) + 1
            values = {"version": version, "digest": digest, "body": canonical(body).decode(),
                      "updated_at": time.time()}
            if row is None:
                conn.execute(insert(s.policies).values(name=name, **values))
            else:
                conn.execute(update(s.policies).where(s.policies.c.name == name).values(**values))
            self._audit(conn, [("policy", name, {"version": version, "digest": digest})])
            return True, version

    def get_policy(self, name: str) -> tuple[int, dict[str, Any]] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(s.policies).where(s.policies.c.name == name)).first()
        return None if row is None else (int(row.version), json.loads(row.body))

    def assign(self, cvm: str, policy: str) -> bool:
        """Assign a policy to a C-VM; returns whether anything changed."""
        with self._write() as conn:
            if conn.execute(select(s.policies.c.name).where(s.policies.c.name == policy)).first() \
                    is None:
                raise StoreError(f"no policy named {policy!r}")
            row = conn.execute(select(s.assignments).where(s.assignments.c.cvm == cvm)).first()
            if row is not None and row.policy == policy:
                return False
            if row is None:
                conn.execute(insert(s.assignments).values(cvm=cvm, policy=policy))
            else:
                conn.execute(update(s.assignments).where(s.assignments.c.cvm == cvm)
                             .values(policy=policy))
            self._audit(conn, [("assign", cvm, {"policy": policy})])
            return True

    def policy_snapshot(self) -> tuple[dict[str, str], dict[str, tuple[int, dict[str, Any]]]]:
        """Every assignment and policy in two queries: what the REM-S caches for ingest."""
        with self.engine.connect() as conn:
            assigned = {str(r.cvm): str(r.policy) for r in conn.execute(select(s.assignments))}
            policies = {str(r.name): (int(r.version), json.loads(r.body))
                        for r in conn.execute(select(s.policies))}
        return assigned, policies

    def policy_of(self, cvm: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(s.assignments.c.policy)
                               .where(s.assignments.c.cvm == cvm)).first()
        return None if row is None else str(row.policy)

    # ---------------------------------------------------------------- A-VMs
    def enroll(self, avm_id: str, ak_pem: str, ek_cert_pem: str | None) -> None:
        with self._write() as conn:
            conn.execute(s.avms.delete().where(s.avms.c.avm_id == avm_id))
            conn.execute(insert(s.avms).values(avm_id=avm_id, ak_pem=ak_pem,
                                               ek_cert_pem=ek_cert_pem, enrolled_at=time.time()))
            self._audit(conn, [("enroll", avm_id,
                                {"ak_sha256": hashlib.sha256(ak_pem.encode()).hexdigest()})])

    def ak_of(self, avm_id: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(s.avms.c.ak_pem).where(s.avms.c.avm_id == avm_id)).first()
        return None if row is None else str(row.ak_pem)

    # -------------------------------------------------------------- reports
    def ingest(self, reports: Sequence[NewReport], verdicts: Sequence[NewVerdict] = ()
               ) -> list[str]:
        """Store reports and verdicts in ONE transaction, audited; returns the digests.

        The REM-S hands over everything that arrived while the previous batch was
        being written: one lock, one audit-tail read, one commit for all of it is
        what lets a REM-S keep up with thousands of reports a second. A replayed
        (cvm, seq) aborts the whole batch with :class:`DuplicateReport`.
        """
        now = time.time()
        rows, audits, digests = [], [], []
        for r in reports:
            raw = canonical(r.body)
            digest = r.digest or hashlib.sha256(raw).hexdigest()
            digests.append(digest)
            rows.append({"cvm": r.cvm, "avm_id": r.avm_id, "seq": r.seq, "digest": digest,
                         "prev_hash": r.prev_hash, "received_at": now,
                         "result": str(r.body.get("result", "error"))[:16],
                         "body": raw.decode()})
            audits.append(("report", r.cvm, {"seq": r.seq, "digest": digest, "avm": r.avm_id}))
        verdict_rows = []
        for v in verdicts:
            verdict_rows.append({"cvm": v.cvm, "status": v.status,
                                 "vector": canonical(v.vector).decode(), "ear": None,
                                 "issued_at": v.issued_at, "expires_at": v.expires_at,
                                 "report_seq": v.report_seq})
            audits.append(("verdict", v.cvm, {"status": v.status, "vector": v.vector,
                                              "expires_at": v.expires_at, "seq": v.report_seq}))
        with self._write() as conn:
            if rows:
                try:
                    conn.execute(insert(s.reports), rows)
                except IntegrityError as exc:
                    # Leaving the block rolls back: on PostgreSQL the failed INSERT has
                    # aborted the transaction, and nothing of it may be committed.
                    which = ", ".join(f"{r.cvm}#{r.seq}" for r in reports[:4])
                    raise DuplicateReport(f"report {which} is already stored") from exc
            if verdict_rows:
                # One native upsert (ON CONFLICT) on both engines: no update-then-insert race.
                ins = (pg_insert(s.verdicts) if conn.dialect.name == "postgresql"
                       else sqlite_insert(s.verdicts))
                conn.execute(ins.on_conflict_do_update(
                    index_elements=[s.verdicts.c.cvm],
                    set_={c: ins.excluded[c] for c in verdict_rows[0] if c != "cvm"}),
                    verdict_rows)
            self._audit(conn, audits)
        return digests

    def add_report(self, cvm: str, avm_id: str, seq: int, prev_hash: str,
                   body: dict[str, Any], digest: str | None = None) -> str:
        """Store one report (see :meth:`ingest`); returns its digest.

        ``digest`` is the control channel's chain digest when the report came
        over it (so a restarted REM-S resumes the chain); else SHA-256 of the body.
        """
        return self.ingest([NewReport(cvm, avm_id, seq, prev_hash, body, digest)])[0]

    def last_seq(self, cvm: str) -> int:
        with self.engine.connect() as conn:
            row = conn.execute(select(s.reports.c.seq).where(s.reports.c.cvm == cvm)
                               .order_by(s.reports.c.seq.desc()).limit(1)).first()
        return 0 if row is None else int(row.seq)

    def reports(self, cvm: str, limit: int = 50) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(s.reports).where(s.reports.c.cvm == cvm)
                                .order_by(s.reports.c.seq.desc()).limit(limit)).all()
        return [{"seq": r.seq, "digest": r.digest, "prev_hash": r.prev_hash,
                 "received_at": r.received_at, "result": r.result, "avm": r.avm_id,
                 "report": json.loads(r.body)} for r in rows]

    # ------------------------------------------------------------- verdicts
    def put_verdict(self, cvm: str, status: str, vector: dict[str, int], issued_at: float,
                    expires_at: float, report_seq: int | None) -> None:
        self.ingest([], [NewVerdict(cvm, status, vector, issued_at, expires_at, report_seq)])

    def verdict(self, cvm: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(s.verdicts).where(s.verdicts.c.cvm == cvm)).first()
        if r is None:
            return None
        return {"cvm": cvm, "status": r.status, "vector": json.loads(r.vector),
                "issued_at": r.issued_at, "expires_at": r.expires_at, "report_seq": r.report_seq}

    def expired_verdicts(self, now: float) -> list[str]:
        """C-VMs whose verdict has lapsed (no fresh report within the staleness limit)."""
        with self.engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(
                select(s.verdicts.c.cvm).where(s.verdicts.c.expires_at <= now))]

    def cvms(self) -> list[str]:
        with self.engine.connect() as conn:
            names = {r[0] for r in conn.execute(select(s.verdicts.c.cvm))}
            names |= {r[0] for r in conn.execute(select(s.assignments.c.cvm))}
        return sorted(names)

    # ----------------------------------------------------------------- audit
    def _audit(self, conn: Any, entries: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """Append (kind, subject, payload) entries to the hash chain, in order."""
        if not entries:
            return
        tail = conn.execute(select(s.audit.c.hash).order_by(s.audit.c.id.desc()).limit(1)
                            .with_for_update()).first()
        prev = GENESIS if tail is None else str(tail.hash)
        ts = round(time.time(), 6)
        rows = []
        for kind, subject, payload in entries:
            entry = {"ts": ts, "kind": kind, "subject": subject, "payload": payload}
            digest = chain_hash(prev, entry)
            rows.append({"ts": ts, "kind": kind, "subject": subject,
                         "payload": canonical(payload).decode(), "prev_hash": prev,
                         "hash": digest})
            prev = digest
        conn.execute(insert(s.audit), rows)

    def verify_audit(self) -> AuditCheck:
        """Walk the audit chain from the start; report the first broken entry."""
        prev, count = GENESIS, 0
        with self.engine.connect() as conn:
            for row in conn.execute(select(s.audit).order_by(s.audit.c.id)):
                count += 1
                entry = {"ts": row.ts, "kind": row.kind, "subject": row.subject,
                         "payload": json.loads(row.payload)}
                if row.prev_hash != prev:
                    return AuditCheck(False, count, row.id, "entry missing or reordered before it")
                if chain_hash(prev, entry) != row.hash:
                    return AuditCheck(False, count, row.id, "entry altered")
                prev = row.hash
        return AuditCheck(True, count)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
    # Let SQLAlchemy emit BEGIN itself (_sqlite_begin) instead of pysqlite's implicit one.
    dbapi_conn.isolation_level = None


def _sqlite_begin(conn: Connection) -> None:
    """Writers take SQLite's write lock up front (waiting up to the busy timeout).

    A deferred transaction that reads and then writes fails at once with
    SQLITE_BUSY_SNAPSHOT when another connection committed in between; BEGIN
    IMMEDIATE makes concurrent writers queue instead.
    """
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("vims_write")
                         else "BEGIN")
