"""The reference pages of the docs site against the code: every listener
parameter of the core's table (`_core.PARAMETERS`) is documented once, where
it is allowed; the metrics page is made from `_core.METRICS` (docs/hooks.py),
and the collector exports just those."""

from __future__ import annotations

import re
from pathlib import Path

import kumo_listener as kumo
from kumo_listener import _core

ROOT = Path(__file__).resolve().parent.parent
PARAMETERS_PAGE = ROOT / "docs" / "reference" / "parameters.md"
METRICS_PAGE = ROOT / "docs" / "reference" / "metrics.md"


def table_rows(page: Path) -> list[list[str]]:
    """The cells of the page's table rows whose first cell is a `name`."""
    rows = []
    for line in page.read_text(encoding="utf-8").splitlines():
        if re.match(r"\|\s*`[a-z_][a-z0-9_]*`\s*\|", line):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def documented_parameters() -> dict[str, str]:
    """Name → where (`top level` or `anywhere…`), from the docs' table."""
    documented: dict[str, str] = {}
    for name, where, *_ in table_rows(PARAMETERS_PAGE):
        name = name.strip("`")
        assert name not in documented, f"{name} is documented twice"
        documented[name] = where
    return documented


def declared_parameters() -> dict[str, str]:
    """Name → `top_level` or `anywhere`, from the core's table."""
    return dict(_core.PARAMETERS)


def test_every_parameter_is_documented_where_it_is_allowed():
    documented = documented_parameters()
    declared = declared_parameters()
    assert set(documented) == set(declared)
    for name, where in declared.items():
        expected = "top level" if where == "top_level" else "anywhere"
        assert documented[name].startswith(expected), (name, documented[name])


def test_documented_places_match_the_validation():
    for name, where in documented_parameters().items():
        errors = kumo.validate_overrides({name: ["not a value of any parameter"]})
        assert not any("unknown parameter" in error for error in errors), (name, errors)
        top_level_only = any("only allowed at the top level" in error for error in errors)
        assert top_level_only == (where == "top level"), (name, errors)


def test_the_collector_exports_every_declared_metric_and_no_other():
    with kumo.Server(sink="discard") as server:
        server.start_esmtp_listener(listen="127.0.0.1:0")
        families = list(server.metrics_collector().collect())
    exported = {(family.name, family.type, family.documentation) for family in families}
    assert exported == {(name, kind, help_text) for name, kind, help_text, _ in _core.METRICS}


def test_the_metrics_page_is_made_from_the_declared_table():
    assert "<!-- metrics-table -->" in METRICS_PAGE.read_text(encoding="utf-8")
