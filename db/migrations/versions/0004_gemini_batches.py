"""Gemini Batch API jobs

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 01:00:00

One row per batch job (annotation/gemini_batch.py), written before the upload so that a restart
re-attaches to the job instead of submitting it again.
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'gemini_batches',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('dataset_id', sa.Integer(), nullable=False),
        sa.Column('model', sa.String(length=80), nullable=False),
        sa.Column('source', sa.String(length=80), nullable=False),
        sa.Column('prompt_version', sa.String(length=32), nullable=False),
        sa.Column('display_name', sa.String(length=128), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=True),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('input_file', sa.String(length=128), nullable=True),
        sa.Column('output_file', sa.String(length=128), nullable=True),
        sa.Column('items', sa.JSON(), nullable=False),
        sa.Column('frames', sa.Integer(), nullable=False),
        sa.Column('requests', sa.Integer(), nullable=False),
        sa.Column('ok', sa.Integer(), nullable=False),
        sa.Column('rejected', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('failures', sa.JSON(), nullable=False),
        sa.Column('rejected_by_reason', sa.JSON(), nullable=False),
        sa.Column('estimated_tokens', sa.Integer(), nullable=False),
        sa.Column('input_tokens', sa.Integer(), nullable=False),
        sa.Column('output_tokens', sa.Integer(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('display_name'),
        sa.UniqueConstraint('name'),
    )
    with op.batch_alter_table('gemini_batches', schema=None) as batch_op:
        batch_op.create_index('ix_gemini_batches_dataset_state', ['dataset_id', 'state'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('gemini_batches', schema=None) as batch_op:
        batch_op.drop_index('ix_gemini_batches_dataset_state')
    op.drop_table('gemini_batches')
