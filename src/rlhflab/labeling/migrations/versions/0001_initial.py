"""The initial schema: users, sessions, tasks, votes, settings (as rlhflab.labeling.store
created them before migrations; a database made then is stamped with this revision).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("settings",
                    sa.Column("key", sa.String(length=64), nullable=False),
                    sa.Column("value", sa.Text(), nullable=False),
                    sa.PrimaryKeyConstraint("key"))
    op.create_table("tasks",
                    sa.Column("id", sa.Integer(), nullable=False),
                    sa.Column("prompt", sa.JSON(), nullable=False),
                    sa.Column("responses", sa.JSON(), nullable=False),
                    sa.Column("meta", sa.JSON(), nullable=False),
                    sa.Column("overlap", sa.Integer(), nullable=False),
                    sa.Column("gold", sa.JSON(none_as_null=True), nullable=True),
                    sa.Column("created", sa.DateTime(), nullable=False),
                    sa.PrimaryKeyConstraint("id"))
    op.create_table("users",
                    sa.Column("id", sa.Integer(), nullable=False),
                    sa.Column("name", sa.String(length=64), nullable=False),
                    sa.Column("role", sa.String(length=16), nullable=False),
                    sa.Column("salt", sa.String(length=64), nullable=False),
                    sa.Column("token_hash", sa.String(length=128), nullable=False),
                    sa.Column("created", sa.DateTime(), nullable=False),
                    sa.PrimaryKeyConstraint("id"),
                    sa.UniqueConstraint("name"))
    op.create_table("sessions",
                    sa.Column("id_hash", sa.String(length=64), nullable=False),
                    sa.Column("user_id", sa.Integer(), nullable=False),
                    sa.Column("csrf", sa.String(length=64), nullable=False),
                    sa.Column("expires", sa.DateTime(), nullable=False),
                    sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
                    sa.PrimaryKeyConstraint("id_hash"))
    op.create_table("votes",
                    sa.Column("id", sa.Integer(), nullable=False),
                    sa.Column("task_id", sa.Integer(), nullable=False),
                    sa.Column("user_id", sa.Integer(), nullable=False),
                    sa.Column("shown", sa.JSON(), nullable=False),
                    sa.Column("status", sa.String(length=16), nullable=False),
                    sa.Column("answer", sa.JSON(none_as_null=True), nullable=True),
                    sa.Column("confidence", sa.Integer(), nullable=True),
                    sa.Column("reason", sa.Text(), nullable=True),
                    sa.Column("key", sa.String(length=64), nullable=True),
                    sa.Column("served_at", sa.DateTime(), nullable=False),
                    sa.Column("submitted_at", sa.DateTime(), nullable=True),
                    sa.Column("seconds", sa.Float(), nullable=True),
                    sa.ForeignKeyConstraint(["task_id"], ["tasks.id"]),
                    sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
                    sa.PrimaryKeyConstraint("id"),
                    sa.UniqueConstraint("key"),
                    sa.UniqueConstraint("task_id", "user_id"))
    op.create_index(op.f("ix_votes_task_id"), "votes", ["task_id"], unique=False)
    op.create_index(op.f("ix_votes_user_id"), "votes", ["user_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_votes_user_id"), table_name="votes")
    op.drop_index(op.f("ix_votes_task_id"), table_name="votes")
    op.drop_table("votes")
    op.drop_table("sessions")
    op.drop_table("users")
    op.drop_table("tasks")
    op.drop_table("settings")
