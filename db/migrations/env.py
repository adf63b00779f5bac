"""Alembic environment: runs migrations on the engine of `sqlalchemy.url` (set by db.session)."""
from alembic import context

from db.models import Base
from db.session import get_engine

config = context.config


def run_migrations_online() -> None:
    engine = get_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        # SQLite can't ALTER most things in place: batch mode rebuilds tables when needed.
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
