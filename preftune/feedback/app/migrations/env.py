"""Alembic environment: runs on the connection that ``preftune.feedback.app.db.migrate`` passes in."""

from alembic import context
from sqlalchemy import create_engine

from preftune.feedback.app.models import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # plain `alembic` command line
    with create_engine(config.get_main_option("sqlalchemy.url")).begin() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    context.run_migrations()
