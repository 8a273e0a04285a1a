"""Secure rounds: the step of a round's secure sum, and the sites' messages for it.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None
# What this revision adds, left to it when an unversioned database is adopted.
added_columns = [('rounds', 'secure_step'), ('rounds', 'secure_attempt')]


def upgrade() -> None:
    # As in 0002: a table adoption created is already at the newest shape.
    inspector = sa.inspect(op.get_bind())
    if 'secure_step' not in {c['name'] for c in inspector.get_columns('rounds')}:
        with op.batch_alter_table('rounds') as batch:
            batch.add_column(sa.Column('secure_step', sa.String(length=16), nullable=True))
            batch.add_column(sa.Column('secure_attempt', sa.Integer(), nullable=True))
    if 'secure_messages' not in inspector.get_table_names():
        op.create_table(
            'secure_messages',
            sa.Column('id', sa.Integer(), nullable=False),
            sa.Column('round_id', sa.Integer(), nullable=False),
            sa.Column('site_id', sa.Integer(), nullable=False),
            sa.Column('step', sa.String(length=16), nullable=False),
            sa.Column('attempt', sa.Integer(), nullable=False),
            sa.Column('body', sa.LargeBinary(), nullable=False),
            sa.Column('received_at', sa.DateTime(), nullable=False),
            sa.ForeignKeyConstraint(['round_id'], ['rounds.id']),
            sa.ForeignKeyConstraint(['site_id'], ['sites.id']),
            sa.PrimaryKeyConstraint('id'),
            sa.UniqueConstraint('round_id', 'site_id', 'step', 'attempt'))


def downgrade() -> None:
    op.drop_table('secure_messages')
    with op.batch_alter_table('rounds') as batch:
        batch.drop_column('secure_attempt')
        batch.drop_column('secure_step')
