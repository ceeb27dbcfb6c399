"""Recording claimed rows' routes (`db.store.assign_routes`), on MariaDB and on SQLite (the embedded
default): every row gets its own provider and normalised recipient, whatever the batch's size, including
batches that take several statements and sizes that are not a power of two."""
from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import insert, select

from db import store
from db.models import Dispatch


@pytest.mark.parametrize("engine_fixture", ["db", "sqlite_db"])
def test_every_claimed_row_gets_its_own_route_whatever_the_batch_size(engine_fixture, request):
    engine = request.getfixturevalue(engine_fixture)
    sizes = {"mobilgroup": 1, "accolades": 3, "ozeki": 600, "smsc": 1025}
    routes, row_id = {}, 1
    for provider, size in sizes.items():
        for _ in range(size):
            routes[row_id] = (provider, f"7916{row_id:07d}")
            row_id += 1
    now = datetime.now().replace(microsecond=0)
    with engine.begin() as conn:
        conn.execute(insert(Dispatch), [{"batchcontact_id": i, "claim_token": "t", "state": "queued",
                                         "created_at": now, "updated_at": now} for i in routes])

    store.assign_routes(engine, routes)

    with engine.connect() as conn:
        stored = {r.batchcontact_id: (r.provider, r.recipient)
                  for r in conn.execute(select(Dispatch.batchcontact_id, Dispatch.provider, Dispatch.recipient))}
    assert stored == routes
