"""Tables of marked values: rows in sections, laid out as aligned text or as JSON; each value carries its text
and a mark saying where it came from (reported, computed, measured, datasheet, input). `nanoseek cost` and
`nanoseek plan` print them."""

from __future__ import annotations

import json
from typing import Any, NamedTuple


class Row(NamedTuple):
    section: tuple[str, str]  # (JSON name, title)
    key: str  # JSON name
    label: str
    value: Any
    text: str
    mark: str  # reported / computed / measured / datasheet / input


class Table:
    """Rows in sections; `render()` aligns them as text, `to_json()` gives {section: {title, values}}."""

    def __init__(self):
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self._section = ("", "")

    def section(self, key: str, title: str) -> None:
        self._section = (key, title)

    def add(self, key: str, label: str, value, fmt=str, mark: str = "computed") -> None:
        self.rows.append(Row(self._section, key, label, value, fmt(value), mark))

    def render(self) -> str:
        wl, wv = max(len(r.label) for r in self.rows) + 2, max(len(r.text) for r in self.rows)
        out, section = [], None
        for r in self.rows:
            if r.section != section:
                out.append(("" if section is None else "\n") + r.section[1])
                section = r.section
            out.append(f"  {r.label:<{wl}}{r.text:>{wv}}  {r.mark}")
        return "\n".join(out + ([""] + self.notes if self.notes else []))

    def to_json(self) -> str:
        d: dict[str, dict] = {}
        for r in self.rows:
            group = d.setdefault(r.section[0], {"title": r.section[1], "values": {}})
            group["values"][r.key] = {"value": r.value, "text": r.text, "mark": r.mark, "label": r.label}
        return json.dumps(d, indent=2)
