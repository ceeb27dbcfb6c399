"""Alembic environment for our own tables; `smsctl db upgrade` runs it with the configured database."""
from alembic import context

from db.engine import engine_for
from db.models import Base

config = context.config


def run_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url")
    connectable = config.attributes.get("connection")
    if connectable is None:
        connectable = engine_for(url)
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            # asterCC's database is shared: keep our bookkeeping table clearly ours.
            version_table="sms_alembic_version",
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `smsctl db upgrade` against the database")
run_migrations()
