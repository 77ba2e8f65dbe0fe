"""Alembic environment: the URL comes from infra.migrate (or M2IO settings), the metadata from our models."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from services.common.models import Base

config = context.config
target_metadata = Base.metadata


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    # The per-dimension vector expression indexes (HNSW until 0010, IVFFlat since) are written in SQL
    # in the migrations; the models cannot express them, so autogenerate must not offer to drop them.
    return not (type_ == "index" and name and ("_embedding_hnsw_" in name or "_embedding_ivfflat_" in name))


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from services.common.settings import get_settings

    return get_settings().require_database_url()


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            include_object=include_object,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
