"""Output formats shared by the CLI's read commands: ``-o json|yaml|table`` (``short``, istioctl's
name for the table, is accepted too).

Owns the rendering of rows (list of flat dicts) and documents. Invariants: pure (returns text);
`table` shows the given columns in order, missing cells as ``-``, and never truncates (an
operator copying a SPIFFE ID out of a table must get all of it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

FORMATS = ("table", "short", "json", "yaml")


def _cell(value: Any) -> str:
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """`columns`: (header, key) pairs."""
    grid = [[h for h, _ in columns]] + [[_cell(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in grid
    )


def document(obj: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(obj, indent=2, sort_keys=False, default=str)
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False).rstrip()
