"""Creating tables: ours through Alembic migrations, asterCC's (development, tests and demo only) the
way asterCC creates them.

asterCC publishes no DDL; its open-source sibling asterCRM uses MyISAM tables with `NOT NULL default ''`
strings and zero-date defaults, so `create_astercc` makes exactly that on MySQL/MariaDB: the code must work
on such tables, not on the friendlier ones our models would create.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from sqlalchemy import Index, MetaData, inspect, text
from sqlalchemy.engine import Connection, Engine

from .models import AsterccBase

MIGRATIONS = Path(__file__).with_name("migrations")

ASTERCC_MYSQL_DDL = (
    """CREATE TABLE IF NOT EXISTS cc10_batchcontact_archives (
        id int(11) NOT NULL AUTO_INCREMENT,
        archivetype varchar(30) NOT NULL default '',
        content text NOT NULL,
        PRIMARY KEY (id)
    ) ENGINE=MyISAM DEFAULT CHARSET=utf8""",
    """CREATE TABLE IF NOT EXISTS cc10_batchcontacts (
        id int(11) NOT NULL AUTO_INCREMENT,
        batchcontact_archive_id int(11) NOT NULL default 0,
        target varchar(50) NOT NULL default '',
        status varchar(30) NOT NULL default 'new',
        schedulertime datetime NOT NULL default '0000-00-00 00:00:00',
        contacttime datetime NOT NULL default '0000-00-00 00:00:00',
        creby varchar(50) NOT NULL default '',
        created datetime NOT NULL default '0000-00-00 00:00:00',
        error_msg varchar(255) NOT NULL default '',
        responsenote varchar(255) NOT NULL default '',
        PRIMARY KEY (id)
    ) ENGINE=MyISAM DEFAULT CHARSET=utf8""",
)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Create or migrate our own tables in the database at `url`."""
    command.upgrade(alembic_config(url), revision)


@contextmanager
def astercc_mode(conn: Connection) -> Iterator[None]:
    """Run the block in asterCC's permissive `sql_mode` on MariaDB/MySQL (its zero-date defaults; what does
    not fit its 3-byte `utf8` columns, an emoji, stored as `?` with a warning, not refused), then give the
    connection its mode back: a pooled connection must not carry it into our own statements, which run in
    the server's strict mode everywhere else."""
    if conn.dialect.name != "mysql":
        yield
        return
    mode = conn.scalar(text("SELECT @@SESSION.sql_mode"))
    conn.execute(text("SET SESSION sql_mode = ''"))
    try:
        yield
    finally:
        conn.execute(text("SET SESSION sql_mode = :mode"), {"mode": mode})


def create_astercc(engine: Engine) -> None:
    """Create asterCC's two tables if they do not exist (never touches existing ones)."""
    if engine.dialect.name == "mysql":
        with engine.begin() as conn, astercc_mode(conn):  # its zero-date defaults
            for ddl in ASTERCC_MYSQL_DDL:
                conn.execute(text(ddl))
    else:
        AsterccBase.metadata.create_all(engine)


ASTERCC_DUE_INDEX = "sms_dispatcher_due"
"""Our optional index on asterCC's `cc10_batchcontacts (status, schedulertime)`."""


def add_astercc_index(engine: Engine) -> bool:
    """Add `ASTERCC_DUE_INDEX` to asterCC's `cc10_batchcontacts`; False if it is already there.

    Every dispatch tick looks for `status='new' AND schedulertime <= NOW()`; asterCC's table has only its
    primary key, so without this index each tick reads the whole table (about 0.4 s per million rows on a
    small server, every few seconds), and with it only the due rows. Optional and never run by `upgrade`,
    because the table is asterCC's: on MyISAM, adding the index rebuilds the table under a write lock
    (seconds per million rows: run it off hours), and an asterCC upgrade that rebuilds the table may drop
    it again (add it again; this is idempotent)."""
    if _has_due_index(engine):
        return False
    _due_index().create(engine)
    return True


def drop_astercc_index(engine: Engine) -> bool:
    """Remove `ASTERCC_DUE_INDEX` again; False if it was not there."""
    if not _has_due_index(engine):
        return False
    _due_index().drop(engine)
    return True


def _due_index() -> Index:
    # On a copy of the table: an Index attaches itself to its table, and one left on the models' metadata
    # would be created by every later `create_astercc` on SQLite (twice after two calls: "already exists").
    table = AsterccBase.metadata.tables["cc10_batchcontacts"].to_metadata(MetaData())
    return Index(ASTERCC_DUE_INDEX, table.c.status, table.c.schedulertime)


def _has_due_index(engine: Engine) -> bool:
    return any(ix["name"] == ASTERCC_DUE_INDEX for ix in inspect(engine).get_indexes("cc10_batchcontacts"))
