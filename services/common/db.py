"""Engine and sessions, one engine per process (created on first use, not at import)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from services.common.settings import get_settings


@lru_cache(maxsize=4)
def engine_for(url: str) -> Engine:
    # pool_pre_ping: a worker outlives Postgres restarts; a dead pooled connection is replaced
    # instead of failing the next task.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def get_engine() -> Engine:
    return engine_for(get_settings().require_database_url())


@lru_cache(maxsize=4)
def session_factory(engine: Engine) -> sessionmaker:
    # One factory per engine: `sessionmaker(...)` makes a Session subclass, too costly per transaction.
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A transaction: committed when the block ends, rolled back on any exception."""
    session = session_factory(get_engine())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def vector_literal(vector) -> str:
    """A vector as pgvector's text input (`[0.1,0.2,...]`), for `CAST(:param AS vector(N))` in raw SQL."""
    return "[" + ",".join(f"{float(v):.7f}" for v in vector) + "]"
