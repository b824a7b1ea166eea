"""Initial REM-S schema: policies, assignments, A-VMs, reports, verdicts, audit log.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "assignments",
        sa.Column("cvm", sa.String(64), primary_key=True),
        sa.Column("policy", sa.String(64), sa.ForeignKey("policies.name"), nullable=False),
    )
    op.create_table(
        "avms",
        sa.Column("avm_id", sa.String(64), primary_key=True),
        sa.Column("ak_pem", sa.Text, nullable=False),
        sa.Column("ek_cert_pem", sa.Text, nullable=True),
        sa.Column("enrolled_at", sa.Float, nullable=False),
    )
    op.create_table(
        "reports",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("cvm", sa.String(64), nullable=False, index=True),
        sa.Column("avm_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.UniqueConstraint("cvm", "seq", name="uq_reports_cvm_seq"),
    )
    op.create_table(
        "verdicts",
        sa.Column("cvm", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("vector", sa.Text, nullable=False),
        sa.Column("ear", sa.Text, nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("report_seq", sa.Integer, nullable=True),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
    )


def downgrade() -> None:
    for table in ("audit", "verdicts", "reports", "avms", "assignments", "policies"):
        op.drop_table(table)
