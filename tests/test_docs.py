"""The reference pages of the docs site against the code: every listener
parameter in the table of rust/params/mod.rs is documented once, where it is
allowed; every metric the collector exports is documented."""

from __future__ import annotations

import re
from pathlib import Path

import kumo_listener as kumo

ROOT = Path(__file__).resolve().parent.parent
PARAMETERS_PAGE = ROOT / "docs" / "reference" / "parameters.md"
METRICS_PAGE = ROOT / "docs" / "reference" / "metrics.md"
PARAMS_TABLE = ROOT / "rust" / "params" / "mod.rs"

# Blocks handled by the merge itself rather than rows of the table.
BLOCKS = {"peer", "via"}


def table_rows(page: Path) -> list[list[str]]:
    """The cells of the page's table rows whose first cell is a `name`."""
    rows = []
    for line in page.read_text(encoding="utf-8").splitlines():
        if re.match(r"\|\s*`[a-z_]+`\s*\|", line):
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
    """Name → `top_level` or `anywhere`, from `listener_params!`."""
    source = PARAMS_TABLE.read_text(encoding="utf-8")
    table = source[source.index("listener_params! {") :]
    top_level = table[table.index("top_level {") : table.index("anywhere {")]
    anywhere = table[table.index("anywhere {") :]
    anywhere = anywhere[: anywhere.index("\n    }\n")]
    row = re.compile(r"^\s+([a-z_]+):", re.MULTILINE)
    declared = {name: "top_level" for name in row.findall(top_level)}
    declared.update({name: "anywhere" for name in row.findall(anywhere)})
    return declared


def test_every_parameter_is_documented_where_it_is_allowed():
    documented = documented_parameters()
    declared = declared_parameters()
    assert set(documented) == set(declared) | BLOCKS
    for name, where in declared.items():
        expected = "top level" if where == "top_level" else "anywhere"
        assert documented[name].startswith(expected), (name, documented[name])


def test_documented_places_match_the_validation():
    for name, where in documented_parameters().items():
        errors = kumo.validate_overrides({name: ["not a value of any parameter"]})
        assert not any("unknown parameter" in error for error in errors), (name, errors)
        top_level_only = any("only allowed at the top level" in error for error in errors)
        assert top_level_only == (where == "top level"), (name, errors)


def test_every_metric_is_documented():
    documented = {row[0].strip("`"): row[1] for row in table_rows(METRICS_PAGE)}
    with kumo.Server(sink="discard") as server:
        server.start_esmtp_listener(listen="127.0.0.1:0")
        families = list(server.metrics_collector().collect())
    exported = {}
    for family in families:
        name = f"{family.name}_total" if family.type == "counter" else family.name
        exported[name] = family.type
    assert exported == documented
