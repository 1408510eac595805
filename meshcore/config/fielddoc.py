"""The generated ``docs/config-fields.md``: the field table (`meshcore.config.fields`) rendered.

Owns: `render_markdown` and the generator (``python -m meshcore.config.fielddoc`` rewrites the
file, ``--check`` only compares; a unit test checks the committed file is current).

Invariant: pure rendering of the table; rows sorted per kind.
"""

from __future__ import annotations

import sys
from pathlib import Path

from meshcore.config.fields import CONDITION_KEYS, FIELDS, LABELS, UNSUPPORTED_KINDS


def render_markdown() -> str:
    """The generated ``docs/config-fields.md``."""
    lines = [
        "# Configuration fields: implemented, refused, warned",
        "",
        "Generated from `meshcore/config/fields.py` by `python -m meshcore.config.fielddoc`;",
        "do not edit by hand (a unit test checks this file is current).",
        "",
        "- **implemented**: Istio / Gateway API semantics.",
        "- **warned**: accepted, not implemented; the object is applied without it and a",
        "  finding (AMB0203) says so.",
        "- **refused**: not implemented (AMB0202). An AuthorizationPolicy using one fails closed",
        "  (ALLOW rules match nothing, DENY rules match everything); a routing object using one is",
        "  not applied.",
        "- a field that is not listed is unknown (AMB0201) and treated as refused.",
        "- L4 (AuthorizationPolicy): `l4` = node proxies enforce it; `l7-only` = node proxies",
        "  apply Istio's ztunnel rule (an ALLOW rule using it matches nothing, a DENY rule is",
        "  enforced on its L4 attributes alone).",
        "",
        "Reported on the control plane's `/debug/config`, by `ambientctl analyze`, and in the",
        "object's status (Istio `status.validationMessages`, Gateway API conditions).",
        "",
    ]
    for kind in sorted(FIELDS):
        lines += [f"## {kind}", "", "| field | status | L4 | note |", "|---|---|---|---|"]
        for path in sorted(FIELDS[kind]):
            row = FIELDS[kind][path]
            status = row.status.value + (" (map)" if row.free else "")
            note = row.note.replace("|", "\\|")
            lines.append(f"| `{path}` | {status} | {row.l4.value} | {note} |")
        lines.append("")
    lines += [
        "## Authorization Policy Conditions (`when` keys)",
        "",
        "| key | waypoint (L7) | node proxy (L4) | note |",
        "|---|---|---|---|",
    ]
    for key, (key_status, l4, note) in CONDITION_KEYS.items():
        lines.append(f"| `{key}` | {key_status.value} | {l4.value} | {note} |")
    lines += ["", "Any other key is unknown and refused.", ""]
    lines += [
        "## Labels and annotations read",
        "",
        "| key | on | values | meaning |",
        "|---|---|---|---|",
    ]
    for key, (kinds, allowed, meaning) in LABELS.items():
        values = ", ".join(allowed) if allowed else "any"
        lines.append(f"| `{key}` | {kinds} | {values} | {meaning} |")
    lines.append("")
    lines += ["## Kinds not implemented", "", "| kind | level | effect |", "|---|---|---|"]
    for kind, (level, message) in sorted(UNSUPPORTED_KINDS.items()):
        lines.append(f"| {kind} | {level} | {message} |")
    lines.append("")
    return "\n".join(lines)


DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config-fields.md"


def main(argv: list[str]) -> int:
    text = render_markdown()
    if argv[1:] == ["--check"]:
        current = DOC_PATH.read_text() if DOC_PATH.exists() else ""
        return 0 if current == text else 1
    DOC_PATH.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
