"""Verdicts no longer carry their EAR: it is signed when a relying party asks.

Signing an EAR per stored report cost more than storing the report; the REM-S
now signs one per verdict on the first decision request and caches it.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER a column's nullability in place.
    with op.batch_alter_table("verdicts") as batch:
        batch.alter_column("ear", existing_type=sa.Text, nullable=True)


def downgrade() -> None:
    op.execute("UPDATE verdicts SET ear = '' WHERE ear IS NULL")
    with op.batch_alter_table("verdicts") as batch:
        batch.alter_column("ear", existing_type=sa.Text, nullable=False)
