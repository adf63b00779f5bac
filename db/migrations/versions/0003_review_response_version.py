"""reviews remember the response version they judged

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 16:30:00

A correction edited after its review is no longer "accepted": export compares the review's
`response_version` with the response's current `version`.
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.add_column(sa.Column('response_version', sa.Integer(), nullable=True))
    # Reviews written before this revision judged whatever version was current then; the best
    # we know is the response's present version.
    op.execute("UPDATE reviews SET response_version = (SELECT version FROM responses "
               "WHERE responses.id = reviews.response_id)")


def downgrade() -> None:
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_column('response_version')
