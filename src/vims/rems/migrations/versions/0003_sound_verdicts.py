"""Sound verdicts: per-check results, A-VM bindings, scoped tokens, references,
TPM counters per AK, verdict details and signed audit checkpoints.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "check_results",
        sa.Column("cvm", sa.String(64), primary_key=True),
        sa.Column("check_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("category", sa.String(32), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("findings", sa.Text, nullable=False),
        sa.Column("avm_id", sa.String(64), nullable=False),
        sa.Column("report_seq", sa.Integer, nullable=True),
        sa.Column("reported_at", sa.Float, nullable=False),
    )
    op.create_table(
        "bindings",
        sa.Column("cvm", sa.String(64), primary_key=True),
        sa.Column("avm_id", sa.String(64), nullable=False, index=True),
        sa.Column("bound_at", sa.Float, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("token_id", sa.String(16), primary_key=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("avm_id", sa.String(64), nullable=True),
        sa.Column("note", sa.String(128), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("used_at", sa.Float, nullable=True),
    )
    op.create_table(
        "references",
        sa.Column("scope", sa.String(8), primary_key=True),  # avm | cvm
        sa.Column("subject", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("audit_id", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("entries", sa.Integer, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("token", sa.Text, nullable=False),  # JWS by the REM-S key over the above
    )
    with op.batch_alter_table("avms") as batch:
        batch.add_column(sa.Column("reset_count", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("restart_count", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("clock", sa.BigInteger, nullable=True))
    with op.batch_alter_table("verdicts") as batch:
        batch.add_column(sa.Column("policy_id", sa.String(96), nullable=True))
        batch.add_column(sa.Column("checks", sa.Text, nullable=True))
        batch.add_column(sa.Column("reasons", sa.Text, nullable=True))
        batch.add_column(sa.Column("stale_check", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("verdicts") as batch:
        for column in ("stale_check", "reasons", "checks", "policy_id"):
            batch.drop_column(column)
    with op.batch_alter_table("avms") as batch:
        for column in ("clock", "restart_count", "reset_count"):
            batch.drop_column(column)
    for table in ("audit_checkpoints", "references", "tokens", "bindings", "check_results"):
        op.drop_table(table)
