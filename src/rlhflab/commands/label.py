"""``rlhflab label ...``: the labeling server, its people, tasks and votes (docs/labeling.md).

| subcommand | what |
|------------|------|
| ``serve --db URL [--host 127.0.0.1] [--port 8000]`` | the web app (uvicorn); loopback unless told |
| ``user --db URL --name NAME [--role labeler\\|admin]`` | a new user; prints their token once |
| ``guidelines --db URL --from F.md`` | the guidelines the labelers read (Markdown), as the admin's page sets them |
| ``load --db URL (--from F \\| --policy DIR [--policy-b DIR] --prompts F [--k 4]) [--overlap N] [--gold F]`` | tasks from a preference file or sampled from a policy (or half from each of two); gold tasks (known answers) mixed in |
| ``bots --db URL [--n 20] [--url URL]`` | the world's raters as labelers through the HTTP API (a server of their own on a free loopback port unless ``--url``) |
| ``export --db URL --out prefs.jsonl [--format trl\\|label-studio\\|argilla]`` | TRL pairs with their votes, which ``rlhflab rm --data`` reads, or Label Studio's or Argilla 2's JSON (``load --format`` reads them back) |

``--db`` is a SQLAlchemy URL (``sqlite:///labels.db``, the default; ``postgresql://...``)
or a file path, read as SQLite.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlhflab.errors import InputError

DEFAULT_DB = "sqlite:///labels.db"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="label_command", metavar="SUBCOMMAND", parser_class=type(p))
    sub.required = True

    def with_db(name: str, help_text: str):
        q = sub.add_parser(name, help=help_text, description=help_text)
        q.add_argument("--db", default=DEFAULT_DB, metavar="URL",
                       help=f"the database: a SQLAlchemy URL or a SQLite file (default {DEFAULT_DB})")
        return q

    q = with_db("serve", "serve the labeling web app")
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    q.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    q = with_db("user", "create a user and print their token")
    q.add_argument("--name", required=True, help="the user's name (letters, digits, '-', '_', '.')")
    q.add_argument("--role", choices=("labeler", "admin"), default="labeler", help="labeler (default) or admin")
    q = with_db("guidelines", "set the guidelines (Markdown) shown on the labeler's page")
    q.add_argument("--from", dest="data", required=True, metavar="F", help="a Markdown file")
    q = with_db("load", "create tasks from a preference file or from a policy's samples")
    q.add_argument("--from", dest="data", metavar="F",
                   help="preference rows (prompt, chosen, rejected, or responses as rlhflab collect writes)")
    q.add_argument("--policy", metavar="DIR", help="sample the responses from this policy (with --prompts)")
    q.add_argument("--prompts", metavar="F", help="prompt rows to sample --k responses for (with --policy)")
    q.add_argument("--policy-b", metavar="DIR",
                   help="a second policy: half of --k from each, so that people compare the two (with --policy)")
    q.add_argument("--k", type=int, default=4, help="responses sampled per prompt (default 4)")
    q.add_argument("--seed", type=int, default=0, help="sampling seed")
    q.add_argument("--config", help="YAML preset whose generation settings the sampling uses")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set generation.temperature=0.7 (repeatable)")
    q.add_argument("--overlap", type=int, default=3, help="labelers per task (default 3)")
    q.add_argument("--gold", metavar="F", help="preference rows with known answers, mixed in unannounced")
    q.add_argument("--format", choices=("rows", "label-studio", "argilla"), default="rows",
                   help="--from's format: preference rows (default), a Label Studio JSON export of pairwise tasks "
                        "or an Argilla 2 record JSON of rankings; their annotations come in as votes")
    q = with_db("bots", "the world's raters answer the queue as labelers, through the HTTP API")
    q.add_argument("--n", type=int, default=20, help="bots (default 20)")
    q.add_argument("--url", help="a running server (default: one of their own on a free loopback port)")
    q.add_argument("--max-answers", type=int, help="answers per bot at most (default: until the queue is empty)")
    q.add_argument("--seed", type=int, default=0, help="the bots' seed")
    q.add_argument("--config", help="YAML preset whose world.rater the bots follow (default: built-in defaults)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set world.rater.noise=0.5 (repeatable)")
    q = with_db("export", "write the votes as TRL preference pairs")
    q.add_argument("--out", required=True, help="the JSONL file to write")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--format", choices=("trl", "label-studio", "argilla"), default="trl",
                   help="TRL preference pairs with votes (default, JSONL), Label Studio's JSON (pairwise tasks with "
                        "each answer an annotation) or Argilla 2's record JSON (each ranking a response)")


def database_url(value: str) -> str:
    return value if "://" in value else f"sqlite:///{value}"


def open_store(args):
    from rlhflab.labeling.store import Store

    return Store(database_url(args.db))


def run(args) -> int:
    return {"serve": serve, "user": user, "guidelines": guidelines, "load": load, "bots": bots,
            "export": export}[args.label_command](args)


def serve(args) -> int:
    import uvicorn

    from rlhflab.labeling.server import create_app

    if not 0 < args.port < 65536:
        raise InputError(f"--port: expected 1-65535, got {args.port}")
    app = create_app(open_store(args))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"rlhflab label serve: listening on {args.host}, reachable from other machines; put it behind "
              "HTTPS (a reverse proxy) before people sign in from them", file=sys.stderr)
    print(f"labeling server on http://{args.host}:{args.port} (database {args.db})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def user(args) -> int:
    token = open_store(args).create_user(args.name, args.role)
    print(f"{args.name} ({args.role}) token: {token}")
    return 0


def guidelines(args) -> int:
    try:
        text = Path(args.data).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read: {err}", file=args.data) from None
    open_store(args).set_setting("guidelines", text)
    print(f"guidelines set from {args.data} ({len(text)} characters)")
    return 0


def load(args) -> int:
    from rlhflab.labeling.io import load_tasks

    if args.gold and not Path(args.gold).exists():
        raise InputError("cannot open: No such file or directory", file=args.gold)
    if bool(args.data) == bool(args.policy or args.prompts or args.policy_b):
        raise InputError("give --from F, or --policy DIR with --prompts F")
    if args.policy_b and not args.policy:
        raise InputError("--policy-b goes with --policy (the two policies compared)")
    if args.format != "rows" and not args.data:
        raise InputError(f"--format {args.format} describes --from F")
    if args.format in ("label-studio", "argilla"):
        from rlhflab.labeling.argilla import from_argilla
        from rlhflab.labeling.label_studio import from_label_studio

        if args.gold:
            raise InputError(f"--gold goes with preference rows, not with --format {args.format}")
        read = from_label_studio if args.format == "label-studio" else from_argilla
        n_tasks, n_votes = open_store(args).add_answered(read(args.data, overlap=args.overlap))
        print(f"{n_tasks} tasks with {n_votes} votes loaded into {args.db} from {args.data} ({args.format})")
        return 0
    if args.data:
        tasks = load_tasks(args.data, overlap=args.overlap)
    else:
        from rlhflab.config import load_config
        from rlhflab.labeling.io import sample_tasks

        if not (args.policy and args.prompts):
            raise InputError("--policy and --prompts go together")
        cfg = load_config(args.config, args.overrides)
        tasks, dropped = sample_tasks(args.policy, args.prompts, k=args.k, overlap=args.overlap,
                                      gen=cfg.generation, seed=args.seed, policy_b=args.policy_b)
        if dropped:
            print(f"{dropped} prompts left out: fewer than two distinct responses among their {args.k} samples",
                  file=sys.stderr)
        if not tasks:
            raise InputError("no task: every prompt's samples were alike", file=args.prompts)
    gold = load_tasks(args.gold, overlap=args.overlap, gold=True) if args.gold else []
    store = open_store(args)
    store.add_tasks(tasks + gold)
    print(f"{len(tasks)} tasks, {len(gold)} gold tasks loaded into {args.db} (overlap {args.overlap})")
    return 0


def bots(args) -> int:
    from rlhflab.config import load_config
    from rlhflab.labeling.bots import run_bots, running_server

    if args.n < 1:
        raise InputError(f"--n: expected an integer >= 1, got {args.n}")
    rater = load_config(args.config, args.overrides).world.rater
    store = open_store(args)
    accounts = store.bot_accounts(args.n)
    if args.url:
        counts = run_bots(args.url, accounts, rater, seed=args.seed, max_answers=args.max_answers)
    else:
        from rlhflab.labeling.server import create_app

        with running_server(create_app(store)) as url:
            counts = run_bots(url, accounts, rater, seed=args.seed, max_answers=args.max_answers)
    print(f"{sum(counts.values())} answers from {len(counts)} bots")
    return 0


def export(args) -> int:
    from rlhflab.data import write_jsonl
    from rlhflab.labeling.io import export_rows

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError("exists already (--overwrite replaces it)", file=str(out))
    if args.format == "label-studio":
        import json

        from rlhflab.labeling.label_studio import to_label_studio

        tasks, counts = to_label_studio(open_store(args))
        out.write_text(json.dumps(tasks, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"{counts['tasks']} pairwise tasks with {counts['annotations']} annotations written to {out} "
              f"(left out: {counts['rankings_left_out']} rankings of more than two, "
              f"{counts['ties_or_both_bad_left_out']} ties or both-bad answers; Label Studio's Pairwise has neither)")
        return 0
    if args.format == "argilla":
        import json

        from rlhflab.labeling.argilla import to_argilla

        records, counts = to_argilla(open_store(args))
        out.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"{counts['records']} records with {counts['responses']} ranking responses written to {out} "
              f"(left out: {counts['ties_or_both_bad_left_out']} ties or both-bad answers; an Argilla ranking has "
              "neither)")
        return 0
    rows, counts = export_rows(open_store(args))
    if not rows:
        raise InputError(f"no pair has a majority yet in {args.db} ({counts.get('pairs', 0)} pairs answered)")
    write_jsonl(out, rows)
    print(f"{len(rows)} pairs written to {out} ({counts.get('pairs_without_majority', 0)} pairs without a "
          "majority left out)")
    return 0
