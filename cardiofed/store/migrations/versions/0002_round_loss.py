"""Each training round's loss, on which a study stops once converged.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None
# What this revision adds, left to it when an unversioned database is adopted.
added_columns = [('rounds', 'loss')]


def upgrade() -> None:
    # An unversioned database whose rounds table adoption had to create got it at the
    # newest shape (cardiofed.store.migrations._adopt_unversioned creates missing tables
    # from the current metadata; existing tables are left these columns to add).
    if 'loss' in {c['name'] for c in sa.inspect(op.get_bind()).get_columns('rounds')}:
        return
    with op.batch_alter_table('rounds') as batch:
        batch.add_column(sa.Column('loss', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('rounds') as batch:
        batch.drop_column('loss')
