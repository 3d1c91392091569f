"""A round of comparisons by people: a policy's samples become tasks in the labeling
database, the round waits for the labelers' votes, and the votes come back as TRL pairs
(what ``rlhflab iterate --labels URL`` does in place of the world's raters).

A task is complete when its overlap of labelers answered it (a skip counts: that labeler is
done with it). The round goes on when every task is complete, or when ``need`` are, or at
``timeout`` seconds with whatever pairs have a majority by then; none at all is an error.
"""

from __future__ import annotations

import sys
import time

from sqlalchemy import func, select

from rlhflab.errors import RunError
from rlhflab.labeling.io import export_rows


def post_groups(store, groups, *, overlap: int, tag: str) -> tuple[list[int], int]:
    """Tasks of sampled groups (``prompt`` a world prompt or text, ``responses``, ``eos``):
    each distinct non-empty response once, groups left with fewer than two dropped.
    Returns (task ids, groups dropped)."""
    from rlhflab.labeling.store import Task

    tasks, dropped = [], 0
    for g in groups:
        seen: dict[tuple[str, bool], None] = {}
        for text, eos in zip(g.responses, g.eos):
            if text.strip():
                seen.setdefault((text, bool(eos)), None)
        if len(seen) < 2:
            dropped += 1
            continue
        prompt = getattr(g.prompt, "text", g.prompt)
        tasks.append(Task(prompt=prompt, responses=[t for t, _ in seen], overlap=overlap, gold=None,
                          meta={"round": tag, "eos": [e for _, e in seen]}))
    with store.session.begin() as s:
        s.add_all(tasks)
        s.flush()
        ids = [t.id for t in tasks]
    return ids, dropped


def complete(store, task_ids: list[int]) -> int:
    """How many of the tasks have their overlap of answers (submitted or skipped)."""
    from rlhflab.labeling.store import Task, Vote

    answered = (select(func.count(Vote.id)).where(Vote.task_id == Task.id, Vote.status != "served")
                .correlate(Task).scalar_subquery())
    with store.session() as s:
        return s.scalar(select(func.count(Task.id)).where(Task.id.in_(task_ids), answered >= Task.overlap))


def people_round(store, groups, *, overlap: int, tag: str, need: int | None = None, timeout: float = 86400.0,
                 poll: float = 5.0, log=None) -> tuple[list[dict], dict]:
    """Post the groups as tasks, wait for the votes, return (TRL rows with votes, counts)."""
    ids, dropped = post_groups(store, groups, overlap=overlap, tag=tag)
    if not ids:
        raise RunError(f"{tag}: no task to label: every prompt's samples were alike")
    goal = len(ids) if need is None else min(need, len(ids))
    end = time.monotonic() + timeout
    done, last = complete(store, ids), -1
    while done < goal and time.monotonic() < end:
        if done != last:
            print(f"[label] {tag}: {done}/{len(ids)} tasks answered by {overlap} labelers (going on at {goal})",
                  file=log or sys.stderr, flush=True)
            last = done
        time.sleep(poll)
        done = complete(store, ids)
    rows, counts = export_rows(store, set(ids))
    if not rows:
        raise RunError(f"{tag}: no pair has a majority of people's votes after {timeout:.0f} s "
                       f"({done}/{len(ids)} tasks answered)")
    return rows, {"labels/tasks": len(ids), "labels/tasks_complete": done, "labels/groups_dropped": dropped,
                  "labels/pairs": counts.get("pairs", 0), "labels/pairs_without_majority":
                  counts.get("pairs_without_majority", 0), "labels/timed_out": done < goal}
