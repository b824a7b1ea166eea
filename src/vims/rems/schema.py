"""The REM-S database schema (SQLAlchemy Core); migrations live in migrations/."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

policies = Table(
    "policies", metadata,
    Column("name", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("digest", String(64), nullable=False),
    Column("body", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

assignments = Table(
    "assignments", metadata,
    Column("cvm", String(64), primary_key=True),
    Column("policy", String(64), ForeignKey("policies.name"), nullable=False),
)

avms = Table(
    "avms", metadata,
    Column("avm_id", String(64), primary_key=True),
    Column("ak_pem", Text, nullable=False),
    Column("ek_cert_pem", Text, nullable=True),
    Column("enrolled_at", Float, nullable=False),
    # The newest quote's TPMS_CLOCK_INFO seen for this AK: never goes back (0003).
    Column("reset_count", BigInteger, nullable=True),
    Column("restart_count", BigInteger, nullable=True),
    Column("clock", BigInteger, nullable=True),
)

reports = Table(
    "reports", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("cvm", String(64), nullable=False, index=True),
    Column("avm_id", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("digest", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("result", String(16), nullable=False),
    Column("body", Text, nullable=False),
    UniqueConstraint("cvm", "seq", name="uq_reports_cvm_seq"),
)

verdicts = Table(
    "verdicts", metadata,
    Column("cvm", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("vector", Text, nullable=False),
    Column("ear", Text, nullable=True),  # legacy: EARs are signed on demand (0002)
    Column("issued_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("report_seq", Integer, nullable=True),
    Column("policy_id", String(96), nullable=True),  # the policy it was appraised under
    Column("checks", Text, nullable=True),  # per check: status, expires_at (JSON)
    Column("reasons", Text, nullable=True),  # JSON list
    Column("stale_check", String(64), nullable=True),  # the check that expires first
)

audit = Table(
    "audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("subject", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
)

# The latest result of each check of each C-VM: what a verdict is judged over (0003).
check_results = Table(
    "check_results", metadata,
    Column("cvm", String(64), primary_key=True),
    Column("check_id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("category", String(32), nullable=False),
    Column("error", Text, nullable=True),
    Column("findings", Text, nullable=False),
    Column("avm_id", String(64), nullable=False),
    Column("report_seq", Integer, nullable=True),
    Column("reported_at", Float, nullable=False),
)

# Which A-VM may report on which C-VM (0003).
bindings = Table(
    "bindings", metadata,
    Column("cvm", String(64), primary_key=True),
    Column("avm_id", String(64), nullable=False, index=True),
    Column("bound_at", Float, nullable=False),
)

# Scoped API credentials; only a hash of each secret is stored (0003).
tokens = Table(
    "tokens", metadata,
    Column("token_id", String(16), primary_key=True),
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("scope", String(16), nullable=False),
    Column("avm_id", String(64), nullable=True),
    Column("note", String(128), nullable=False, server_default=""),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("used_at", Float, nullable=True),
)

# Approved digests of what an A-VM measures into PCR 23 (0003).
references = Table(
    "references", metadata,
    Column("scope", String(8), primary_key=True),
    Column("subject", String(64), primary_key=True),
    Column("kind", String(32), primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Signed heads of the audit chain (0003).
audit_checkpoints = Table(
    "audit_checkpoints", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("audit_id", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("entries", Integer, nullable=False),
    Column("ts", Float, nullable=False),
    Column("token", Text, nullable=False),
)
