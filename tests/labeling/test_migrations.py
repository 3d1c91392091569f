"""The labeling database's Alembic migrations: an empty database upgraded by them has the
schema the models declare, on SQLite and PostgreSQL; a database made before migrations is
stamped and upgraded with its rows kept, by the commands that open it."""

from __future__ import annotations

import json

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from rlhflab.cli import main
from rlhflab.labeling.store import INITIAL, Base, Store, migrate

from .test_app import scratch_dir


def head() -> str:
    from alembic.config import Config

    from rlhflab.labeling import store

    cfg = Config()
    cfg.set_main_option("script_location", str(store.Path(store.__file__).resolve().parent / "migrations"))
    return ScriptDirectory.from_config(cfg).get_current_head()


def differences(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_an_empty_database_upgraded_by_alembic_equals_the_models(database_url):
    store = Store(database_url)
    assert differences(store.engine) == []
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
    # the check sees a difference where there is one
    with store.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_votes_user_id"))
    assert [d[0] for d in differences(store.engine)] == ["add_index"]


def test_a_database_made_before_migrations_is_stamped_and_upgraded(tmp_path, capsys):
    url = f"sqlite:///{scratch_dir()}/old.db"
    old = create_engine(url)
    Base.metadata.create_all(old)  # what the store did before it had migrations
    with old.begin() as conn:
        conn.execute(text("INSERT INTO settings (key, value) VALUES ('guidelines', 'be kind')"))
    assert "alembic_version" not in inspect(old).get_table_names()
    old.dispose()
    rows = tmp_path / "tasks.jsonl"
    rows.write_text(json.dumps({"prompt": "what is 2 plus 2 ?", "chosen": "4 .", "rejected": "5 ."}) + "\n")
    assert main(["label", "load", "--db", url, "--from", str(rows), "--overlap", "1"]) == 0
    store = Store(url)
    assert store.get_setting("guidelines") == "be kind" and len(store.tasks()) == 1
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
    assert differences(store.engine) == []
    assert migrate(store.engine) == head() and INITIAL <= head()
