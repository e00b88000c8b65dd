"""Job rows become the truth of the distributed mode: leases, inputs, idempotency keys.

Revision ID: 0003_job_leases
Revises: 0002_jobs
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_job_leases"
down_revision = "0002_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("input", sa.String(length=512), nullable=True))
        batch.add_column(sa.Column("queue", sa.String(length=160), nullable=True))
        batch.add_column(sa.Column("idempotency_key", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("batch_size", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("suspect", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("deliveries", sa.Integer(), nullable=False, server_default="0"))
        batch.create_index(
            "ix_jobs_owner_idempotency_key", ["owner", "idempotency_key"], unique=True
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner_idempotency_key")
        for column in ("deliveries", "suspect", "batch_size", "lease_expires_at"):
            batch.drop_column(column)
        batch.drop_column("idempotency_key")
        batch.drop_column("queue")
        batch.drop_column("input")
