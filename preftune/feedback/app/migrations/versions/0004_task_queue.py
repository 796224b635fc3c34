"""the task queue: judgements each task still needs, open tasks per project, and their index

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 07:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('needed', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('open_tasks', sa.Integer(), nullable=False, server_default='0'))
    op.execute("UPDATE tasks SET needed = (SELECT p.overlap FROM projects p WHERE p.id = tasks.project_id)"
               " - (SELECT count(*) FROM judgements j WHERE j.task_id = tasks.id)")
    op.execute("UPDATE tasks SET needed = 0 WHERE needed < 0 OR is_gold = true")  # gold tasks are never used up
    op.execute("UPDATE projects SET open_tasks = (SELECT count(*) FROM tasks t WHERE t.project_id = projects.id"
               " AND t.is_gold = false AND t.needed > 0)")
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index('ix_tasks_queue', ['project_id', 'is_gold', 'needed', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_tasks_queue')
        batch_op.drop_column('needed')
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('open_tasks')
