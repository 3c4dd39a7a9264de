"""``vlmtrain compare`` output: the comparison as Markdown (stdout) or as one self-contained HTML page
(inline CSS, no script, no network)."""

from __future__ import annotations

import html
from typing import Any

from vlmtrain.tools.compare import GROUPS, Column, Comparison, Row, Setting

__all__ = ["fmt_value", "format_html", "format_markdown"]


def fmt_value(v: Any) -> str:
    """A config value as YAML writes it: ``true``, ``null``, ``0.0002``, ``[q_proj, k_proj]``, ``""``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt_value(x)}" for k, x in v.items()) + "}"
    return str(v) if str(v) else '""'


def _legend(c: Column) -> str:
    ranks = "ranks from --gpus" if c.kind == "config" else "ranks from summary.json"
    return f"{c.label} = {c.path} ({c.kind}, {c.ranks} GPU{'s' if c.ranks != 1 else ''}, {ranks})"


def _shown(cmp: Comparison, show_all: bool) -> list[tuple[str, list[Setting]]]:
    """(group, its settings) in heading order, only the differing settings unless ``show_all``."""
    out = []
    for group in GROUPS:
        rows = [s for s in cmp.settings if s.group == group and (show_all or s.differs)]
        if rows:
            out.append((group, rows))
    return out


def _settings_title(show_all: bool) -> str:
    return "All settings (≠: differs)" if show_all else "Settings that differ"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]


def _md_rows(title: str, cmp: Comparison, rows: list[Row]) -> list[str]:
    return _md_table([title] + [c.label for c in cmp.columns], [[r.name] + r.text for r in rows])


def format_markdown(cmp: Comparison, show_all: bool = False) -> str:
    """The comparison as Markdown: column legend, settings grouped under heading rows, derived and
    measured quantities, then the ``Not comparable:`` list."""
    n = len(cmp.columns)
    out = ["Columns: " + "; ".join(_legend(c) for c in cmp.columns), "", f"## {_settings_title(show_all)}", ""]
    groups = _shown(cmp, show_all)
    if groups:
        body = []
        for group, settings in groups:
            body.append([f"**{group}**"] + [""] * n)
            for s in settings:
                key = f"≠ {s.key}" if show_all and s.differs else s.key
                body.append([key] + [fmt_value(v) for v in s.values])
        out += _md_table(["setting"] + [c.label for c in cmp.columns], body)
    else:
        out.append("None: every setting is equal (`--all` lists them).")
    out += ["", "## Derived", ""] + _md_rows("quantity", cmp, cmp.derived)
    if cmp.plan_notes:
        out += ["", "Plan assumptions:"] + [f"- {line}" for line in cmp.plan_notes]
    if cmp.measured:
        out += ["", "## Measured (run directories)", ""] + _md_rows("measured", cmp, cmp.measured)
    if cmp.not_comparable:
        out += ["", "Not comparable:"] + [f"- {line}" for line in cmp.not_comparable]
    return "\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left;vertical-align:top}
thead th{background:#eee}
tr.group th{background:#f6f6f6;font-weight:bold}
tr.differs td{background:#fff4d6}
td.key{font-family:monospace}
.warn{color:#a40000}"""


def _h(text: str) -> str:
    return html.escape(text, quote=True)


def _html_table(head: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    """rows: (class of the row, cells); a "group" row is one heading cell across the table."""
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_h(h)}</th>" for h in head) + "</tr></thead>", "<tbody>"]
    for cls, cells in rows:
        if cls == "group":
            out.append(f'<tr class="group"><th colspan="{len(head)}">{_h(cells[0])}</th></tr>')
        else:
            attr = f' class="{cls}"' if cls else ""
            out.append(f"<tr{attr}><td class=\"key\">{_h(cells[0])}</td>"
                       + "".join(f"<td>{_h(c)}</td>" for c in cells[1:]) + "</tr>")
    return out + ["</tbody>", "</table>"]


def format_html(cmp: Comparison, show_all: bool = False) -> str:
    """The same tables as :func:`format_markdown`, as one self-contained HTML page."""
    labels = [c.label for c in cmp.columns]
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           "<title>vlmtrain compare: " + _h(" vs ".join(labels)) + "</title>", f"<style>{_CSS}</style>",
           "</head>", "<body>", "<h1>vlmtrain compare</h1>", "<ul>"]
    out += [f"<li>{_h(_legend(c))}</li>" for c in cmp.columns] + ["</ul>"]
    if cmp.not_comparable:
        out += ['<h2 class="warn">Not comparable:</h2>', '<ul class="warn">']
        out += [f"<li>{_h(line)}</li>" for line in cmp.not_comparable] + ["</ul>"]
    out.append(f"<h2>{_h(_settings_title(show_all))}</h2>")
    groups = _shown(cmp, show_all)
    if groups:
        rows: list[tuple[str, list[str]]] = []
        for group, settings in groups:
            rows.append(("group", [group]))
            rows += [("differs", [f"≠ {s.key}"] + [fmt_value(v) for v in s.values]) if show_all and s.differs
                     else ("", [s.key] + [fmt_value(v) for v in s.values]) for s in settings]
        out += _html_table(["setting"] + labels, rows)
    else:
        out.append("<p>None: every setting is equal (--all lists them).</p>")
    for title, head, table in (("Derived", "quantity", cmp.derived), ("Measured (run directories)", "measured",
                                                                     cmp.measured)):
        if table:
            out += [f"<h2>{_h(title)}</h2>"] + _html_table([head] + labels, [("", [r.name] + r.text) for r in table])
        if title == "Derived" and cmp.plan_notes:
            out += ["<p>Plan assumptions:</p>", "<ul>"] + [f"<li>{_h(line)}</li>" for line in cmp.plan_notes] + ["</ul>"]
    return "\n".join(out + ["</body>", "</html>"]) + "\n"
