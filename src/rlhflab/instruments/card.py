"""The measured record of each finding: how often the rule fired on runs of its own condition
and on healthy runs of the instrument card (``bench/instrument_card.py``: the built-in world's
conditions over seeds and algorithms, each run diagnosed as a user would, the truth from gold
alone), printed beside the finding by ``rlhflab diagnose`` and the report.

The records ship with the package as ``instrument_card.json`` beside this module, written by
``python bench/instrument_card.py --publish`` from a finished card; where the file is absent or
holds no record for a rule, the finding says "no measured record". A record is a count on the
built-in world's runs (a tiny GPT-2 and simulated raters): it says how the rule behaved
where the truth was known, not how it will on a user's model (docs/instruments.md).

The file's shape::

    {"card": {"command": ..., "size": ..., "seeds": [...], "runs": N},
     "records": {"length_hacking": {"condition": "length", "fired": 10, "runs": 10,
                                    "ci": [0.72, 1.0], "healthy_fired": 0, "healthy_runs": 15},
                 "healthy": {"right": 14, "called": 15, "ci": [...]}, ...}}

For a rule, ``fired`` of ``runs`` runs of its ``condition`` (95% Wilson interval ``ci``), of
them ``failed_fired`` of the ``failed_runs`` gold did not find better than SFT, and
``healthy_fired`` of ``healthy_runs`` healthy controls (``healthy_confirmed`` of those where
gold on the rule's prompt family fell, for a rule about one family); for the verdict "healthy", of the
``called`` runs it was given to, ``right`` were healthy by gold.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhflab.errors import InputError

CARD_FILE = Path(__file__).with_name("instrument_card.json")
NO_RECORD = "no measured record"
# A record is poor when the rule caught fewer than half the runs of its own condition, or fired
# on more than 10% of the healthy controls (the card's own goals are 90% and 5%). A fail rule
# with such false alarms is demoted to a warning and does not set the verdict
# (``rlhflab.diagnose.diagnose``); one that misses keeps its severity (when it fires it is
# mostly right) and its record says it misses.
POOR_HIT_RATE = 0.5
POOR_FALSE_ALARMS = 0.1


def false_alarms(record: dict | None) -> bool:
    """Whether a rule's record shows it firing on more than ``POOR_FALSE_ALARMS`` of the healthy
    controls, less the firings gold confirmed (``healthy_confirmed``: a rule about one prompt
    family whose gold on that family fell; a healthy control can regress there too)."""
    if not isinstance(record, dict) or not record.get("healthy_runs"):
        return False
    wrong = record.get("healthy_fired", 0) - record.get("healthy_confirmed", 0)
    return wrong / record["healthy_runs"] > POOR_FALSE_ALARMS


def misses(record: dict | None) -> bool:
    """Whether a rule's record shows it catching fewer than ``POOR_HIT_RATE`` of its condition's
    runs that gold did not find better (``failed_runs``; where the record has none, of all its
    condition's runs): a planted bias the run did not act on is nothing to catch."""
    if not isinstance(record, dict):
        return False
    if record.get("failed_runs"):
        return record.get("failed_fired", 0) / record["failed_runs"] < POOR_HIT_RATE
    if not record.get("runs"):
        return False
    return record.get("fired", 0) / record["runs"] < POOR_HIT_RATE


def load_records(path: Path | None = None) -> dict:
    """The card's records by finding name; {} when the file is absent. A file that is there
    but not the card's shape is an error naming it."""
    path = CARD_FILE if path is None else Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"not a readable instrument card ({err})", file=str(path)) from None
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, dict):
        raise InputError("expected an object with 'records' (bench/instrument_card.py --publish)", file=str(path))
    return records


def record_line(name: str, records: dict) -> str:
    """A finding's record in words, or ``NO_RECORD``."""
    r = records.get(name)
    if not isinstance(r, dict):
        return NO_RECORD
    ci = r.get("ci")
    interval = f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if isinstance(ci, list) and len(ci) == 2 else ""
    if name == "healthy" and "called" in r:
        return f"right on {r['right']}/{r['called']} runs called healthy on the instrument card{interval}"
    if "fired" not in r or "runs" not in r:
        return NO_RECORD
    line = f"fires on {r['fired']}/{r['runs']} {r.get('condition', 'its condition')} runs{interval}"
    if r.get("failed_runs"):
        line += f", {r.get('failed_fired', 0)}/{r['failed_runs']} of those gold did not find better"
    if "healthy_runs" in r:
        line += f", {r.get('healthy_fired', 0)}/{r['healthy_runs']} healthy"
        if r.get("healthy_confirmed"):
            line += f" ({r['healthy_confirmed']} of them confirmed by gold)"
    poor = [why for why, bad in (("false alarms: demoted to a warning", false_alarms(r)),
                                 ("misses most of its condition's runs", misses(r))) if bad]
    return ("poor record (" + "; ".join(poor) + "): " if poor else "") + line + " (instrument card)"


def with_records(result: dict, records: dict | None = None) -> dict:
    """A diagnosis (``rlhflab.diagnose.diagnose``'s result) with each finding's ``record``."""
    records = load_records() if records is None else records
    for f in result.get("findings", []):
        if isinstance(f, dict):
            f["record"] = record_line(str(f.get("name", "")), records)
    return result
