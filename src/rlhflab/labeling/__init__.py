"""The labeling server: people compare responses in a web app, and the votes become TRL pairs.

A layer of its own (docs/architecture.md): it reads the data formats and the world's raters
(for the bot labelers); nothing in training imports it.

- ``store``: the database (SQLAlchemy 2): users, sessions, tasks, votes, settings.
- ``server``: the web app (Starlette): the labeler's page, the admin's page, the JSON API.
- ``agreement``: agreement among labelers, pure functions.
- ``io``: tasks from files, votes to TRL preference pairs.
- ``bots``: the world's raters as labelers, voting through the HTTP API.
"""
