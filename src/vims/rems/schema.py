"""The REM-S database schema (SQLAlchemy Core); migrations live in migrations/."""

from __future__ import annotations

from sqlalchemy import (
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
