"""judgement revisions (annotators change their own judgements; earlier answers are kept)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 07:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('judgements', schema=None) as batch_op:
        batch_op.add_column(sa.Column('revised_at', sa.DateTime(), nullable=True))
    op.create_table('judgement_revisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('judgement_id', sa.Integer(), nullable=False),
    sa.Column('previous', sa.JSON(), nullable=False),
    sa.Column('revised_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['judgement_id'], ['judgements.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('judgement_revisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_judgement_revisions_judgement_id'), ['judgement_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('judgement_revisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_judgement_revisions_judgement_id'))
    op.drop_table('judgement_revisions')
    with op.batch_alter_table('judgements', schema=None) as batch_op:
        batch_op.drop_column('revised_at')
