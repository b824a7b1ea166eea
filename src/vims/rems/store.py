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
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    delete,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from vims.errors import VimsError
from vims.rems import schema as s
from vims.rems.verdict import CheckResult, CheckState, Verdict, results_from_report

GENESIS = "0" * 64
# Key of the PostgreSQL advisory lock every REM-S write transaction holds ("vims").
WRITE_LOCK_KEY = 0x76696D73
TOKEN_SCOPES = ("operator", "read", "enroll")
TOKEN_PREFIX = "vims_"


class StoreError(VimsError):
    """The REM-S database cannot be used."""


class DuplicateReport(StoreError):
    """A report with this C-VM and sequence number is already stored (a replay)."""


class BindingConflict(StoreError):
    """The C-VM is bound to another A-VM; moving it needs an explicit operator action."""


class CounterRegression(StoreError):
    """A quote's TPM counters went back against what the store recorded for its AK."""


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


Judge = Callable[[str, Mapping[str, CheckResult], Mapping[str, Any] | None, float], Verdict]
"""``judge(cvm, latest results, latest view, now)``: the C-VM's verdict (the service's)."""


@dataclass
class Ingested:
    """What one ingest stored: report digests in order, and each touched C-VM's verdict."""

    digests: list[str]
    verdicts: dict[str, Verdict] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditCheck:
    ok: bool
    entries: int
    first_bad_id: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class Token:
    """A scoped API credential as stored (its secret only as a hash)."""

    token_id: str
    scope: str
    avm_id: str | None
    note: str
    created_at: float
    expires_at: float | None
    used_at: float | None


@dataclass(frozen=True)
class TpmCounters:
    """TPMS_CLOCK_INFO counters of an AK's newest quote."""

    reset_count: int
    restart_count: int
    clock: int


def _result_row(cvm: str, r: CheckResult) -> dict[str, Any]:
    return {"cvm": cvm, "check_id": r.check_id, "status": r.status, "category": r.category,
            "error": r.error,
            "findings": canonical(list(r.findings)).decode() if r.findings else "[]",
            "avm_id": r.avm_id, "report_seq": r.report_seq, "reported_at": r.reported_at}


def _result_of(row: Any) -> CheckResult:
    findings = tuple(json.loads(row.findings)) if row.findings != "[]" else ()
    return CheckResult(str(row.check_id), str(row.status), str(row.category), row.error,
                       findings, str(row.avm_id), row.report_seq, float(row.reported_at))


def verdict_row(cvm: str, v: Verdict, issued_at: float) -> dict[str, Any]:
    """A verdict as the verdicts table holds it."""
    checks = {cid: {"status": st.status, "category": st.category, "expires_at": st.expires_at}
              for cid, st in v.checks.items()}
    return {"cvm": cvm, "status": v.status, "vector": canonical(v.vector).decode(), "ear": None,
            "issued_at": issued_at, "expires_at": v.expires_at, "report_seq": v.report_seq,
            "policy_id": v.policy_id, "checks": canonical(checks).decode(),
            "reasons": canonical(v.reasons[:64]).decode(), "stale_check": v.stale_check}


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
    def ingest(self, reports: Sequence[NewReport], judge: Judge | None = None,
               results: Sequence[tuple[str, CheckResult]] = (), now: float | None = None,
               audits: Sequence[tuple[str, str, dict[str, Any]]] = (),
               counters: Mapping[str, TpmCounters] | None = None) -> Ingested:
        """Store reports, their checks' results and the new verdicts in ONE transaction.

        The REM-S hands over everything that arrived while the previous batch was
        being written: one lock, one audit-tail read, one commit for all of it is
        what lets a REM-S keep up with thousands of reports a second. Each report's
        check results replace that check's previous result (others stand); extra
        ``results`` (the ``avm.evidence`` pseudo-check) are merged after them.
        With ``judge``, every C-VM touched gets a new verdict over all its latest
        results, computed inside the transaction (several REM-S instances on one
        database judge each C-VM over the same rows). A replayed (cvm, seq)
        aborts the whole batch with :class:`DuplicateReport`. ``counters`` are the
        newest verified report quotes' TPM counters per A-VM (checked by the caller
        against the session's; recorded here so a restarted REM-S keeps them).
        """
        now = time.time() if now is None else now
        rows, audit_rows, digests = [], list(audits), []
        latest: dict[str, NewReport] = {}
        for r in reports:
            raw = canonical(r.body)
            digest = r.digest or hashlib.sha256(raw).hexdigest()
            digests.append(digest)
            rows.append({"cvm": r.cvm, "avm_id": r.avm_id, "seq": r.seq, "digest": digest,
                         "prev_hash": r.prev_hash, "received_at": now,
                         "result": str(r.body.get("result", "error"))[:16],
                         "body": raw.decode()})
            audit_rows.append(("report", r.cvm, {"seq": r.seq, "digest": digest,
                                                 "avm": r.avm_id}))
            latest[r.cvm] = r
        touched = list(dict.fromkeys([*latest, *(cvm for cvm, _ in results)]))
        out = Ingested(digests)
        with self._write() as conn:
            if rows:
                try:
                    conn.execute(insert(s.reports), rows)
                except IntegrityError as exc:
                    # Leaving the block rolls back: on PostgreSQL the failed INSERT has
                    # aborted the transaction, and nothing of it may be committed.
                    which = ", ".join(f"{r.cvm}#{r.seq}" for r in reports[:4])
                    raise DuplicateReport(f"report {which} is already stored") from exc
            current = self._results(conn, touched)
            changed: dict[tuple[str, str], CheckResult] = {}
            for r in reports:
                for cid, result in results_from_report(r.body, r.avm_id, r.seq, now).items():
                    current.setdefault(r.cvm, {})[cid] = changed[(r.cvm, cid)] = result
            for cvm, result in results:
                current.setdefault(cvm, {})[result.check_id] = result
                changed[(cvm, result.check_id)] = result
            if changed:
                self._upsert(conn, s.check_results, ["cvm", "check_id"],
                             [_result_row(cvm, r) for (cvm, _), r in changed.items()])
            if judge is not None and touched:
                verdict_rows = []
                for cvm in touched:
                    view = latest[cvm].body if cvm in latest else self._view(conn, cvm)
                    v = out.verdicts[cvm] = judge(cvm, current.get(cvm, {}), view, now)
                    verdict_rows.append(verdict_row(cvm, v, now))
                    audit_rows.append(("verdict", cvm, {
                        "status": v.status, "vector": v.vector, "expires_at": v.expires_at,
                        "seq": v.report_seq, "policy": v.policy_id,
                        "checks": {cid: st.status for cid, st in sorted(v.checks.items())},
                        "reasons": v.reasons[:8]}))
                self._upsert(conn, s.verdicts, ["cvm"], verdict_rows)
            for avm_id, c in (counters or {}).items():
                conn.execute(update(s.avms).where(s.avms.c.avm_id == avm_id).values(
                    reset_count=c.reset_count, restart_count=c.restart_count, clock=c.clock))
            self._audit(conn, audit_rows)
        return out

    def _upsert(self, conn: Connection, table: Any, keys: list[str],
                rows: list[dict[str, Any]]) -> None:
        """One native upsert (ON CONFLICT) on both engines: no update-then-insert race."""
        ins = (pg_insert(table) if conn.dialect.name == "postgresql" else sqlite_insert(table))
        conn.execute(ins.on_conflict_do_update(
            index_elements=[table.c[k] for k in keys],
            set_={c: ins.excluded[c] for c in rows[0] if c not in keys}), rows)

    def _results(self, conn: Connection, cvms: Sequence[str]
                 ) -> dict[str, dict[str, CheckResult]]:
        out: dict[str, dict[str, CheckResult]] = {}
        if cvms:
            for row in conn.execute(select(s.check_results)
                                    .where(s.check_results.c.cvm.in_(list(cvms)))):
                out.setdefault(str(row.cvm), {})[str(row.check_id)] = _result_of(row)
        return out

    def _view(self, conn: Connection, cvm: str) -> dict[str, Any] | None:
        row = conn.execute(select(s.reports.c.body).where(s.reports.c.cvm == cvm)
                           .order_by(s.reports.c.seq.desc()).limit(1)).first()
        return None if row is None else dict(json.loads(row.body))

    def check_results(self, cvm: str) -> dict[str, CheckResult]:
        """The latest result of each check of *cvm*."""
        with self.engine.connect() as conn:
            return self._results(conn, [cvm]).get(cvm, {})

    def latest_view(self, cvm: str) -> dict[str, Any] | None:
        """The body of the newest stored report of *cvm* (what verdict rules read)."""
        with self.engine.connect() as conn:
            return self._view(conn, cvm)

    def add_report(self, cvm: str, avm_id: str, seq: int, prev_hash: str,
                   body: dict[str, Any], digest: str | None = None) -> str:
        """Store one report (see :meth:`ingest`); returns its digest.

        ``digest`` is the control channel's chain digest when the report came
        over it (so a restarted REM-S resumes the chain); else SHA-256 of the body.
        """
        return self.ingest([NewReport(cvm, avm_id, seq, prev_hash, body, digest)]).digests[0]

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
    def put_verdict(self, cvm: str, verdict: Verdict, issued_at: float,
                    audit: tuple[str, dict[str, Any]] | None = None) -> None:
        """Store a verdict as it is (a C-VM moved, reset or judged outside an ingest)."""
        with self._write() as conn:
            self._upsert(conn, s.verdicts, ["cvm"], [verdict_row(cvm, verdict, issued_at)])
            self._audit(conn, [("verdict", cvm, {"status": verdict.status,
                                                 "expires_at": verdict.expires_at,
                                                 "reasons": verdict.reasons[:8]})]
                        + ([(audit[0], cvm, audit[1])] if audit else []))

    def verdict(self, cvm: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(s.verdicts).where(s.verdicts.c.cvm == cvm)).first()
        if r is None:
            return None
        return {"cvm": cvm, "status": r.status, "vector": json.loads(r.vector),
                "issued_at": r.issued_at, "expires_at": r.expires_at, "report_seq": r.report_seq,
                "policy_id": r.policy_id, "stale_check": r.stale_check,
                "checks": json.loads(r.checks) if r.checks else {},
                "reasons": json.loads(r.reasons) if r.reasons else []}

    @staticmethod
    def verdict_of(row: Mapping[str, Any]) -> Verdict:
        """A stored verdict (:meth:`verdict`) back as a :class:`Verdict`."""
        checks = {cid: CheckState(str(c["status"]), str(c["category"]), c.get("expires_at"))
                  for cid, c in row["checks"].items()}
        return Verdict(status=row["status"], vector=row["vector"], reasons=row["reasons"],
                       checks=checks, expires_at=float(row["expires_at"]),
                       stale_check=row["stale_check"], policy_id=row["policy_id"] or "",
                       report_seq=row["report_seq"])

    def expired_verdicts(self, now: float) -> list[str]:
        """C-VMs whose verdict has lapsed (no fresh report within the staleness limit)."""
        with self.engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(
                select(s.verdicts.c.cvm).where(s.verdicts.c.expires_at <= now))]

    def cvms(self) -> list[str]:
        with self.engine.connect() as conn:
            names = {r[0] for r in conn.execute(select(s.verdicts.c.cvm))}
            names |= {r[0] for r in conn.execute(select(s.assignments.c.cvm))}
            names |= {r[0] for r in conn.execute(select(s.bindings.c.cvm))}
        return sorted(names)

    # ------------------------------------------------------------- bindings
    def bind(self, cvm: str, avm_id: str, move: bool = False) -> bool:
        """Let *avm_id* (alone) report on *cvm*; returns whether anything changed.

        A C-VM bound to another A-VM moves only with ``move``: its recorded
        results are then dropped, so nothing the old A-VM said counts for the
        new one, and its verdict lapses until the new A-VM reports.
        """
        with self._write() as conn:
            row = conn.execute(select(s.bindings).where(s.bindings.c.cvm == cvm)).first()
            if row is not None and row.avm_id == avm_id:
                return False
            if row is not None and not move:
                raise BindingConflict(f"C-VM {cvm} is bound to A-VM {row.avm_id}; "
                                      "moving it to another A-VM needs move")
            if row is None:
                conn.execute(insert(s.bindings).values(cvm=cvm, avm_id=avm_id,
                                                       bound_at=time.time()))
            else:
                conn.execute(update(s.bindings).where(s.bindings.c.cvm == cvm)
                             .values(avm_id=avm_id, bound_at=time.time()))
                conn.execute(delete(s.check_results).where(s.check_results.c.cvm == cvm))
                conn.execute(update(s.verdicts).where(s.verdicts.c.cvm == cvm).values(
                    expires_at=0.0, stale_check=None,
                    reasons=canonical([f"moved to A-VM {avm_id}: awaiting its reports"])
                    .decode()))
            self._audit(conn, [("bind", cvm, {"avm": avm_id,
                                              "from": row.avm_id if row is not None else None})])
            return True

    def unbind(self, cvm: str) -> bool:
        with self._write() as conn:
            gone = conn.execute(delete(s.bindings).where(s.bindings.c.cvm == cvm)).rowcount
            if gone:
                self._audit(conn, [("unbind", cvm, {})])
            return bool(gone)

    def bindings(self) -> dict[str, str]:
        """C-VM -> the A-VM bound to it."""
        with self.engine.connect() as conn:
            return {str(r.cvm): str(r.avm_id) for r in conn.execute(select(s.bindings))}

    def binding_of(self, cvm: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(s.bindings.c.avm_id).where(s.bindings.c.cvm == cvm)).first()
        return None if row is None else str(row.avm_id)

    # --------------------------------------------------------------- tokens
    def create_token(self, scope: str, avm_id: str | None = None, note: str = "",
                     ttl_s: float | None = None) -> tuple[Token, str]:
        """A new credential; returns it and its secret (shown once, stored hashed)."""
        if scope not in TOKEN_SCOPES:
            raise StoreError(f"unknown token scope {scope!r} (one of {', '.join(TOKEN_SCOPES)})")
        if (scope == "enroll") != (avm_id is not None):
            raise StoreError("an enrollment token names exactly one A-VM; other scopes none")
        token_id = secrets.token_hex(8)
        secret = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(24)}"
        now = time.time()
        token = Token(token_id, scope, avm_id, note[:128], now,
                      now + ttl_s if ttl_s else None, None)
        with self._write() as conn:
            conn.execute(insert(s.tokens).values(
                token_id=token_id, secret_sha256=hashlib.sha256(secret.encode()).hexdigest(),
                scope=scope, avm_id=avm_id, note=token.note, created_at=now,
                expires_at=token.expires_at, used_at=None))
            self._audit(conn, [("token", token_id, {"scope": scope, "avm": avm_id,
                                                    "expires_at": token.expires_at})])
        return token, secret

    def token(self, secret: str) -> Token | None:
        """The stored token whose secret this is (compared by hash), or None."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
            return None
        digest = hashlib.sha256(secret.encode()).hexdigest()
        with self.engine.connect() as conn:
            row = conn.execute(select(s.tokens).where(s.tokens.c.secret_sha256 == digest)).first()
        return None if row is None else Token(
            str(row.token_id), str(row.scope), row.avm_id, str(row.note), float(row.created_at),
            row.expires_at, row.used_at)

    def use_token(self, token_id: str) -> bool:
        """Consume a single-use token; False when it was used already (one winner)."""
        with self._write() as conn:
            used = conn.execute(update(s.tokens).where(s.tokens.c.token_id == token_id)
                                .where(s.tokens.c.used_at.is_(None))
                                .values(used_at=time.time())).rowcount
            if used:
                self._audit(conn, [("token-used", token_id, {})])
            return bool(used)

    def revoke_token(self, token_id: str) -> bool:
        with self._write() as conn:
            gone = conn.execute(delete(s.tokens).where(s.tokens.c.token_id == token_id)).rowcount
            if gone:
                self._audit(conn, [("token-revoked", token_id, {})])
            return bool(gone)

    def tokens(self) -> list[Token]:
        with self.engine.connect() as conn:
            return [Token(str(r.token_id), str(r.scope), r.avm_id, str(r.note),
                          float(r.created_at), r.expires_at, r.used_at)
                    for r in conn.execute(select(s.tokens).order_by(s.tokens.c.created_at))]

    # ----------------------------------------------------------- references
    def set_reference(self, scope: str, subject: str, kind: str, digest: str | None) -> bool:
        """Approve (or, with None, withdraw) a measured digest; returns whether it changed."""
        key = (s.references.c.scope == scope, s.references.c.subject == subject,
               s.references.c.kind == kind)
        with self._write() as conn:
            row = conn.execute(select(s.references.c.digest).where(*key)).first()
            current = None if row is None else str(row.digest)
            if current == digest:
                return False
            if digest is None:
                conn.execute(delete(s.references).where(*key))
            elif row is None:
                conn.execute(insert(s.references).values(scope=scope, subject=subject, kind=kind,
                                                         digest=digest, updated_at=time.time()))
            else:
                conn.execute(update(s.references).where(*key)
                             .values(digest=digest, updated_at=time.time()))
            self._audit(conn, [("reference", subject, {"scope": scope, "kind": kind,
                                                       "digest": digest, "was": current})])
            return True

    def references_for(self, avm_id: str, cvms: Sequence[str]) -> dict[tuple[str, str, str], str]:
        """The approved digests of one A-VM and the C-VMs it names (one query)."""
        r = s.references
        query = select(r).where(((r.c.scope == "avm") & (r.c.subject == avm_id))
                                | ((r.c.scope == "cvm") & r.c.subject.in_(list(cvms))))
        with self.engine.connect() as conn:
            return {(str(x.scope), str(x.subject), str(x.kind)): str(x.digest)
                    for x in conn.execute(query)}

    def references(self, scope: str | None = None, subject: str | None = None
                   ) -> dict[tuple[str, str, str], str]:
        """(scope, subject, kind) -> approved digest."""
        query = select(s.references)
        if scope is not None:
            query = query.where(s.references.c.scope == scope)
        if subject is not None:
            query = query.where(s.references.c.subject == subject)
        with self.engine.connect() as conn:
            return {(str(r.scope), str(r.subject), str(r.kind)): str(r.digest)
                    for r in conn.execute(query)}

    # ---------------------------------------------------------- TPM counters
    def counters(self, avm_id: str) -> TpmCounters | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(s.avms.c.reset_count, s.avms.c.restart_count, s.avms.c.clock)
                             .where(s.avms.c.avm_id == avm_id)).first()
        if r is None or r.reset_count is None:
            return None
        return TpmCounters(int(r.reset_count), int(r.restart_count), int(r.clock))

    def advance_counters(self, avm_id: str, new: TpmCounters,
                         check: Callable[[TpmCounters | None, TpmCounters], None]) -> None:
        """Record an AK's newest counters after ``check(stored, new)`` accepted them.

        Check and write are one transaction under the REM-S write lock, so two
        instances cannot both accept quotes whose counters contradict each other.
        ``check`` raises to refuse (nothing is written then).
        """
        with self._write() as conn:
            r = conn.execute(select(s.avms.c.reset_count, s.avms.c.restart_count, s.avms.c.clock)
                             .where(s.avms.c.avm_id == avm_id)).first()
            stored = (None if r is None or r.reset_count is None else
                      TpmCounters(int(r.reset_count), int(r.restart_count), int(r.clock)))
            check(stored, new)
            conn.execute(update(s.avms).where(s.avms.c.avm_id == avm_id).values(
                reset_count=new.reset_count, restart_count=new.restart_count, clock=new.clock))

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
