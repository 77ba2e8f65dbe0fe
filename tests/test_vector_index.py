"""The vector indexes' sizing rule: sqrt(rows) lists, one below 10k rows, rebuilt when the rows doubled or halved."""

import doctest

import pytest

from services.retriever import vector_index
from services.retriever.vector_index import create_sql, lists_for, needs_rebuild

pytestmark = pytest.mark.unit


def test_doctests():
    result = doctest.testmod(vector_index)
    assert result.attempted > 0
    assert result.failed == 0


def test_an_index_fitted_to_its_rows_is_left_alone_until_they_double_or_halve():
    for rows in (10_000, 100_000, 1_000_000, 4_000_000):
        built = lists_for(rows)
        assert not needs_rebuild(built, rows)
        assert not needs_rebuild(built, int(rows * 1.9)) and needs_rebuild(built, int(rows * 2.1))
        assert not needs_rebuild(built, int(rows * 0.55)) or rows * 0.55 < 10_000
        assert needs_rebuild(built, int(rows * 0.45))
    assert not needs_rebuild(1, 9_999)  # below 10k rows one list (an exact scan) stays


def test_the_index_is_the_expression_the_search_orders_by():
    from services.retriever.search import vector_search_sql

    assert "USING ivfflat ((embedding::halfvec(384)) halfvec_cosine_ops) WITH (lists = 316)" in create_sql(
        "chunks", 384, 316
    )
    assert "ORDER BY embedding::halfvec(384) <=> CAST(:query AS halfvec(384))" in vector_search_sql("chunks", 384)
    assert "embedding_dim = 384" in vector_search_sql("chunks", 384)
