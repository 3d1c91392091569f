"""Assemble the report: one self-contained HTML file (inline CSS and SVG, no scripts, no
network), built from the artifacts a run left on disk."""

from __future__ import annotations

import html
from pathlib import Path

CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { background: #e6f4ea; } .warn { background: #fff4d6; } .fail { background: #fde2e1; }
.ok { color: #1b7f3b; } .verdict { font-weight: bold; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.pipeline span { display: inline-block; padding: 4px 10px; margin: 2px; border: 1px solid #bbb; border-radius: 4px;
                 background: #fafafa; }
.small { color: #666; font-size: 0.85em; }
code { background: #f3f3f3; padding: 0 3px; }
"""


GENERATOR = '<meta name="generator" content="rlhflab report">'


def esc(x) -> str:
    return html.escape(str(x))


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if 1e-2 <= abs(v) < 1e4 or v == 0 or v != v else f"{v:.3g}"
    return esc(v)


def table(header: list[str], rows: list[list], classes: list[list[str]] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cells = []
        for j, v in enumerate(row):
            cls = [classes[i][j]] if classes and classes[i][j] else []
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                cls.append("num")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{fmt(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def page(title: str, sections: list[tuple[str, str]], subtitle: str = "") -> str:
    body = [f"<h1>{esc(title)}</h1>"]
    if subtitle:
        body.append(f'<p class="small">{esc(subtitle)}</p>')
    for heading, content in sections:
        body.append(f"<h2>{esc(heading)}</h2>\n{content}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def is_report(path: str | Path) -> bool:
    """Whether ``path`` is a page this module wrote (which a new report may replace): its
    generator tag, or the title of a report written before the tag existed."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(1024)
    except OSError:
        return False
    return head.startswith("<!DOCTYPE html>") and (GENERATOR in head or "<title>rlhflab run report</title>" in head)


def write_page(path: str | Path, text: str) -> Path:
    """Write at once: a temporary file beside ``path``, then a rename (a reader never sees
    half a page; an interrupted write leaves the earlier page)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
