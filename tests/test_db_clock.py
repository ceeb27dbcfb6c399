"""The database clock expressions: offsets must reach the database as written, every time (a compiled
statement is cached by shape, so an offset baked into the SQL would repeat the first one ever used)."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from db.engine import db_now_plus, engine_for, seconds_since


@pytest.mark.parametrize("url_fixture", ["mariadb_url", "sqlite_url"])
def test_each_offset_is_applied_not_the_first_one_cached(url_fixture, request):
    engine = engine_for(request.getfixturevalue(url_fixture))
    with engine.connect() as conn:
        readings = {s: conn.scalar(select(db_now_plus(s))) for s in (0, -60, 3600, 7)}
    base = readings[0]
    assert {s: round((t - base).total_seconds()) for s, t in readings.items()} == {0: 0, -60: -60, 3600: 3600, 7: 7}


@pytest.mark.parametrize("url_fixture", ["mariadb_url", "sqlite_url"])
def test_seconds_since_counts_whole_seconds_on_the_database_clock(url_fixture, request):
    engine = engine_for(request.getfixturevalue(url_fixture))
    with engine.connect() as conn:
        ages = [conn.scalar(select(seconds_since(db_now_plus(-s)))) for s in (0, 90, 7200)]
    assert ages == [0, 90, 7200]


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'clock.db'}"
