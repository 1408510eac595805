"""`ambientctl analyze` over Istio's bookinfo samples (tests/data/bookinfo, vendored from
istio/istio) and the repository's examples: every field and kind the mesh does not implement is
reported with its code, exactly as the field table (`meshcore.config.fields`) lists it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ambientctl.main import main
from meshcore.config.findings import check_object

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "tests" / "data" / "bookinfo"
EXAMPLES = [
    ROOT / "charts" / "ambient" / "examples",
    ROOT / "examples" / "lab",
    ROOT / "examples" / "lab-waypoint",
]


def analyze(capsys: pytest.CaptureFixture[str], *paths: Path) -> list[dict[str, str]]:
    argv = ["analyze", "-o", "json"]
    for p in paths:
        argv += ["-d", str(p)]
    main(argv)
    result: list[dict[str, str]] = json.loads(capsys.readouterr().out)
    return result


def test_bookinfo_unsupported_fields_and_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    msgs = analyze(capsys, BOOKINFO)
    got = {(m["code"], m["ref"]) for m in msgs}
    assert got == {
        # trafficPolicy.tls: ISTIO_MUTUAL is what HBONE does anyway; reported, not silent.
        ("AMB0203", "DestinationRule default/details"),
        ("AMB0203", "DestinationRule default/productpage"),
        ("AMB0203", "DestinationRule default/ratings"),
        ("AMB0203", "DestinationRule default/reviews"),
        ("AMB0204", "Gateway default/bookinfo-gateway"),  # Istio (ingress) Gateway
        # Two samples both define DestinationRule details: as one directory, the later wins.
        ("AMB0107", "DestinationRule default/details"),
        ("AMB0204", "ServiceEntry default/googleapis"),
        ("AMB0206", "VirtualService default/bookinfo"),  # bound to the ingress gateway only
    }


def _docs(paths: list[Path]) -> list[dict[str, object]]:
    out = []
    for base in paths:
        for f in sorted([*base.rglob("*.yaml"), *base.rglob("*.yml")]):
            for doc in yaml.safe_load_all(f.read_text()):
                if isinstance(doc, dict) and isinstance(doc.get("kind"), str):
                    out.append(doc)
    return out


@pytest.mark.parametrize("paths", [[BOOKINFO], EXAMPLES], ids=["bookinfo", "examples"])
def test_every_field_finding_is_reported(
    paths: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    msgs = analyze(capsys, *paths)
    reported = {(m["code"], m["ref"].split(" ", 1)[0], m["message"]) for m in msgs}
    for doc in _docs(paths):
        for f in check_object(str(doc["kind"]), doc):
            text = f.render() if f.path else f.message
            assert (f.code, doc["kind"], text) in reported, (doc["kind"], f)
